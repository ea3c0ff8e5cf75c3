"""The workload: a Lightning-style checkpoint of a chosen size (weights plus Adam moments).

Pure Python for the shapes and sizes (the orchestrator imports it without torch); torch only to build it.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["build_state", "layer_shapes", "state_bytes", "tensor_bytes"]

MiB = 1024 * 1024


def layer_shapes(nbytes: int, layers: int = 8) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a transformer-like model whose fp32 weights take about ``nbytes / 3`` bytes."""
    per_copy = max(1024, nbytes // 3 // 4)  # float32 elements in each of weights, exp_avg, exp_avg_sq
    d = max(8, int(math.sqrt(per_copy / (12 * layers + 4))))
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "attn.proj.bias": (d,),
                p + "ln1.weight": (d,),
                p + "ln2.weight": (d,),
                p + "mlp.fc1.weight": (4 * d, d),
                p + "mlp.fc1.bias": (4 * d,),
                p + "mlp.fc2.weight": (d, 4 * d),
                p + "mlp.fc2.bias": (d,),
            }
        )
    used = sum(math.prod(s) for s in shapes.values()) + d
    shapes["embed.weight"] = (max(1, (per_copy - used) // d), d)  # the embedding absorbs the remainder
    shapes["norm.weight"] = (d,)
    return shapes


def state_bytes(nbytes: int) -> int:
    """Tensor bytes of :func:`build_state` ``(nbytes)``, computed without torch: 3 fp32 copies + 1 step each."""
    shapes = layer_shapes(nbytes)
    return 3 * 4 * sum(math.prod(s) for s in shapes.values()) + 4 * len(shapes)


def build_state(nbytes: int, seed: int = 0) -> tuple[dict[str, Any], int]:
    """A Lightning-style checkpoint of about ``nbytes``: weights plus Adam's ``exp_avg`` and ``exp_avg_sq``.

    About 330 tensors from 4 KiB to a third of the total; random (incompressible) values copied from a 32 MiB
    seeded pool, which is much faster than generating every byte. Returns the dict and its tensor bytes.
    """
    import torch

    pool = torch.empty(8 * MiB).uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))
    offset = 0

    def fill(shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal offset
        t = torch.empty(shape)
        flat = t.view(-1)
        for start in range(0, flat.numel(), pool.numel()):
            n = min(pool.numel(), flat.numel() - start)
            src_start = offset % (pool.numel() - n + 1)
            flat[start : start + n].copy_(pool[src_start : src_start + n])
            offset += 7919
        return t

    shapes = layer_shapes(nbytes)
    weights = {name: fill(shape) for name, shape in shapes.items()}
    opt_state = {
        i: {"step": torch.tensor(1000.0), "exp_avg": fill(shape), "exp_avg_sq": fill(shape).abs_()}
        for i, shape in enumerate(shapes.values())
    }
    state = {
        "epoch": 3,
        "global_step": 1000,
        "state_dict": weights,
        "optimizer_states": [
            {
                "state": opt_state,
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "params": list(range(len(shapes)))}],
            }
        ],
        "lr_schedulers": [],
    }
    return state, tensor_bytes(state)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested structure."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0
