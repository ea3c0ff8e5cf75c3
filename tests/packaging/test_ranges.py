"""s3ckpt declares ranges, not pins (it is a library): they must install beside what its users already have,
CI must stay reproducible (constraints.txt), and the lower bounds must be the ones `make test-min` tests.

The resolver test asks pip's real resolver (``--dry-run``, PyPI) for ``s3ckpt[lightning] s3fs`` and for
``s3ckpt s3torchconnector``, both at once (about 35 s, mostly boto3 metadata while pip backtracks to the
botocore that aiobotocore pins). torch is held at the release this machine has on disk, so no torch wheel is
downloaded; it plays no part in either conflict.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra, items in PROJECT["optional-dependencies"].items():
        if extra != "test":  # the test extra only names other extras and tools
            reqs += [Requirement(r) for r in items]
    return reqs


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip()):
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _lower_bound(req: Requirement) -> str:
    lows = [s.version for s in req.specifier if s.operator == ">="]
    assert len(lows) == 1, f"{req}: a range needs exactly one lower bound"
    return lows[0]


def test_library_dependencies_are_ranges_with_an_upper_bound() -> None:
    for req in _requirements():
        if req.name == "s3ckpt":
            continue
        ops = {s.operator for s in req.specifier}
        assert "==" not in ops, f"{req}: a library must not pin (pin in constraints.txt)"
        assert ">=" in ops and "<" in ops, f"{req}: declare the tested floor and the next major as ceiling"


def test_constraints_pin_releases_inside_the_ranges() -> None:
    pins = _pins((REPO / "constraints.txt").read_text())
    for req in _requirements():
        if req.name != "s3ckpt" and req.name.lower() in pins:
            assert Version(pins[req.name.lower()]) in req.specifier, f"constraints.txt pins {req.name} outside {req}"
    assert "s3ckpt" not in pins, "the project itself is installed editable, not from the constraints"


def test_make_test_min_runs_at_the_lower_bounds() -> None:
    """The releases `make test-min` installs are exactly pyproject's lower bounds."""
    makefile = (REPO / "Makefile").read_text()
    m = re.search(r"^MIN_PKGS := (.*?)(?<!\\)$", makefile, re.M | re.S)
    assert m, "Makefile has no MIN_PKGS"
    mins = _pins(m.group(1).replace("\\\n", " ").replace(" ", "\n"))
    reqs = {r.name.lower(): r for r in _requirements()}
    for name in ("boto3", "botocore", "crc32c", "lightning"):
        assert Version(mins[name]) == Version(_lower_bound(reqs[name])), (
            f"test-min installs {name}=={mins[name]}, pyproject {reqs[name]}"
        )


def _resolve(tmp: Path, wheel: Path, extra: str, other: str) -> subprocess.Popen[bytes]:
    torch = _pins((REPO / "constraints.txt").read_text())["torch"]
    (tmp / "torch.txt").write_text(f"torch=={torch}\n")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    cmd += ["--disable-pip-version-check", "--report", str(tmp / f"{other}.json"), "-c", str(tmp / "torch.txt")]
    # Wheels only (no builds), but s3torchconnector publishes only an sdist.
    cmd += ["--only-binary=:all:", "--no-binary=s3torchconnector", f"s3ckpt{extra} @ {wheel.as_uri()}", other]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.timeout(240)
def test_pip_resolves_beside_current_s3fs_and_s3torchconnector(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("s3ckpt-*.whl")
    procs = {
        other: _resolve(tmp_path, wheel, extra, other)
        for extra, other in (("[lightning]", "s3fs"), ("", "s3torchconnector"))
    }
    for other, proc in procs.items():
        out, _ = proc.communicate(timeout=220)
        assert proc.returncode == 0, f"pip could not resolve s3ckpt beside {other}:\n{out.decode()[-3000:]}"
    got = {
        other: {
            i["metadata"]["name"].lower(): i["metadata"]["version"]
            for i in json.loads((tmp_path / f"{other}.json").read_text())["install"]
        }
        for other in procs
    }
    print({k: {n: v[n] for n in (k, "boto3", "botocore") if n in v} for k, v in got.items()})
    # s3fs 2024.x and newer need aiobotocore, which pins botocore; with exact boto3 pins pip fell back to 0.4.2.
    assert Version(got["s3fs"]["s3fs"]) >= Version("2024.1"), got["s3fs"]
    assert "aiobotocore" in got["s3fs"] and "lightning" in got["s3fs"]
    assert "s3torchconnectorclient" in got["s3torchconnector"]
    reqs = {r.name: r for r in _requirements()}
    for resolved in got.values():  # what pip chose satisfies what s3ckpt declares
        for name in ("boto3", "botocore", "crc32c"):
            assert Version(resolved[name]) in reqs[name].specifier, (name, resolved[name])
