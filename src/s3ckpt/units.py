"""Human-readable byte counts, shared by the library's summaries and the CLI. Standard library only, so the
CLI can import it without loading torch or boto3."""

from __future__ import annotations

__all__ = ["human_size"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units, as ``aws s3 ls --human-readable``)."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
