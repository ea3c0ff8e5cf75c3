"""The checksum algorithms S3 defines, their combine math, and the out-of-order range digest (no server)."""

from __future__ import annotations

import base64
import hashlib
import random
import threading
import zlib

import crc32c
import pytest

from s3ckpt.layout import SOURCE_STORE, Expected
from s3ckpt.transport import checksums as cs
from s3ckpt.transport.ops import ObjectInfo

# The CRC catalogue's check values (the CRC of b"123456789").
_CHECK = {"CRC32": "cbf43926", "CRC32C": "e3069283", "CRC64NVME": "ae8b14860a799888"}
_DATA = random.Random(7).randbytes(1_000_003)


@pytest.mark.parametrize("algorithm", cs.ALGORITHMS)
def test_every_algorithm_matches_its_reference(algorithm: str) -> None:
    want = {
        "CRC32": zlib.crc32(_DATA).to_bytes(4, "big"),
        "CRC32C": crc32c.crc32c(_DATA).to_bytes(4, "big"),
        "SHA1": hashlib.sha1(_DATA).digest(),
        "SHA256": hashlib.sha256(_DATA).digest(),
    }
    if algorithm in _CHECK:
        assert cs.checksum_of(algorithm, b"123456789").hex() == _CHECK[algorithm]
    if algorithm in want:
        assert cs.checksum_of(algorithm, _DATA) == want[algorithm]
    h = cs.new_hasher(algorithm)  # incremental == one shot
    for i in range(0, len(_DATA), 65_537):
        h.update(memoryview(_DATA)[i : i + 65_537])
    assert h.digest() == cs.checksum_of(algorithm, _DATA)


def test_pure_python_crc64nvme_matches_the_fast_one() -> None:
    """The fallback used when awscrt is absent gives the same values (and the catalogue's check value)."""
    assert cs._crc64nvme_py(b"123456789") == int(_CHECK["CRC64NVME"], 16)
    small = _DATA[:5000]
    assert cs._crc64nvme_py(small[1000:], cs._crc64nvme_py(small[:1000])) == int.from_bytes(
        cs.checksum_of("CRC64NVME", small), "big"
    )


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "CRC64NVME"])
def test_crc_combine_equals_the_whole_buffer(algorithm: str) -> None:
    rng = random.Random(algorithm)
    data = _DATA if algorithm != "CRC64NVME" or cs._crt is not None else _DATA[:100_000]  # pure Python: slow
    whole = int.from_bytes(cs.checksum_of(algorithm, data), "big")
    for cut in [0, 1, 7, len(data) - 1, len(data), *(rng.randrange(len(data)) for _ in range(5))]:
        a = int.from_bytes(cs.checksum_of(algorithm, data[:cut]), "big")
        b = int.from_bytes(cs.checksum_of(algorithm, data[cut:]), "big")
        assert cs.crc_combine(algorithm, a, b, len(data) - cut) == whole, cut
    # A length far beyond the data (a 5 GiB part): combine must agree with two chained steps.
    big = 5 << 30
    step = cs.crc_combine(algorithm, cs.crc_combine(algorithm, whole, 0, big // 2), 0, big - big // 2)
    assert cs.crc_combine(algorithm, whole, 0, big) == step


def _feed(digest: cs.RangeDigest, data: bytes, target: memoryview, ranges: list[tuple[int, int]]) -> None:
    """Feed ``ranges`` from 4 threads, in a shuffled order, in uneven slices; one range fails midway first
    and is fed again from the start (a retried GET)."""
    order = list(ranges)
    random.Random(1).shuffle(order)
    lock = threading.Lock()

    def worker() -> None:
        rng = random.Random(threading.get_ident())
        while True:
            with lock:
                if not order:
                    return
                start, end = order.pop()
            if start == ranges[0][0]:
                abandoned = digest.begin(start, end)  # an attempt cut short: never done()
                abandoned.update(memoryview(data)[start : start + 10])
            part = digest.begin(start, end)
            pos = start
            while pos < end:
                n = min(end - pos, rng.randrange(1, 300_000))
                target[pos : pos + n] = data[pos : pos + n]
                part.update(target[pos : pos + n])
                pos += n
            part.done()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("algorithm", cs.ALGORITHMS)
@pytest.mark.parametrize("composite", [False, True], ids=["full", "composite"])
def test_range_digest_out_of_order(algorithm: str, composite: bool) -> None:
    """Ranges (131 KiB) that complete in any order on any thread give the digest of the whole object, or of
    each part (parts of 300,000 bytes: boundaries inside ranges), as hashing the bytes in one pass would."""
    data = _DATA if algorithm != "CRC64NVME" or cs._crt is not None else _DATA[:200_000]
    parts = [300_000] * (len(data) // 300_000) + ([len(data) % 300_000] if len(data) % 300_000 else [])
    sizes = parts if composite else [len(data)]
    target = memoryview(bytearray(len(data)))
    digest = cs.RangeDigest(algorithm, sizes, target)
    ranges = [(s, min(s + 131_072, len(data))) for s in range(0, len(data), 131_072)]
    _feed(digest, data, target, ranges)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    want = [cs.checksum_of(algorithm, data[bounds[i] : bounds[i + 1]]) for i in range(len(sizes))]
    assert digest.digests() == want


def test_range_digest_refuses_missing_bytes() -> None:
    digest = cs.RangeDigest("CRC32", [100])
    part = digest.begin(0, 50)
    part.update(memoryview(bytes(50)))
    part.done()
    with pytest.raises(ValueError, match=r"never hashed|hashed up to"):
        digest.digests()


def test_stored_checksums_parsed_from_head() -> None:
    info = ObjectInfo("b", "k", 10, "e", checksums={"SHA256": "abc=", "CRC32": "AAAAAA==-3"}, checksum_type="COMPOSITE")
    (first, second) = info.stored_checksums
    assert (first.algorithm, first.value, first.checksum_type, first.parts) == ("CRC32", "AAAAAA==", "COMPOSITE", 3)
    assert second.algorithm == "SHA256"
    full = cs.StoredChecksum.parse("CRC64NVME", "l7huDo7n0ak=")
    assert (full.checksum_type, full.parts) == (cs.FULL_OBJECT, None)


def test_composite_expected_names_the_bad_part() -> None:
    parts = [_DATA[:400_000], _DATA[400_000:]]
    digests = [cs.checksum_of("SHA256", p) for p in parts]
    exp = Expected(
        "SHA256", cs.COMPOSITE, cs.composite_of("SHA256", digests), SOURCE_STORE, (400_000, 600_003), (None, None)
    )
    assert exp.mismatch(digests) is None
    assert exp.value.endswith("-2") and exp.origin == "store composite"
    bad = [digests[0], cs.checksum_of("SHA256", b"other")]
    assert "2 parts' SHA256s" in str(exp.mismatch(bad))
    with_parts = Expected("SHA256", cs.COMPOSITE, exp.digest, SOURCE_STORE, exp.part_sizes, tuple(digests))
    assert "part 2 (bytes 400000-1000002)" in str(with_parts.mismatch(bad))
    assert base64.b64decode(exp.value.split("-")[0]) == exp.digest
