"""DCP items written from a template are exactly ``torch.save``'s bytes, for every dtype and layout a DCP rank
file holds; kinds the template does not know are saved by ``torch.save`` itself."""

from __future__ import annotations

import io

import pytest
import torch

from s3ckpt.dcp.item_template import ItemTemplates
from s3ckpt.zip_crc import BytesSink

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.uint8]


def _torch_save(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _saved(templates: ItemTemplates, t: torch.Tensor) -> bytes:
    sink = BytesSink()
    templates.save(t, sink)
    return bytes(sink.data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_templated_items_are_torch_save_bytes(dtype: torch.dtype) -> None:
    templates = ItemTemplates()
    g = torch.Generator().manual_seed(0)
    expected = 0
    for shape in [(7,), (33, 65), (3, 4, 5), (1,), (4096,)]:
        for i in range(3):  # the first of each kind records the template too
            t = (torch.randn(shape, generator=g) * 100).to(dtype)
            assert _saved(templates, t) == _torch_save(t), (shape, i)
            expected += t.nbytes >= 8  # a few bytes: saved by torch.save (not worth a template)
    assert templates.templated == expected > 0


def test_strided_views_and_other_kinds_fall_back_to_torch_save() -> None:
    templates = ItemTemplates()
    base = torch.randn(16, 8)
    cases = [
        base.t(),  # transposed: same storage, other strides (its own kind)
        base.t().clone(),
        base[2:5],  # a slice: torch.save writes the whole storage
        torch.randn(5, requires_grad=True),
        torch.zeros(0),
        torch.randn(3).conj(),
        torch.nn.Parameter(torch.randn(4)),
    ]
    for t in cases * 2:
        assert _saved(templates, t) == _torch_save(t)


def test_data_starting_like_a_zip_descriptor_is_not_templated() -> None:
    templates = ItemTemplates()
    t = torch.frombuffer(bytearray(b"PK\x07\x08" + bytes(60)), dtype=torch.uint8).clone()
    u = torch.frombuffer(bytearray(b"PK\x07\x09" + bytes(60)), dtype=torch.uint8).clone()
    for x in (u, t, u, t):
        assert _saved(templates, x) == _torch_save(x)
