# One command each: demo, test, lint, bench. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.s3ckpt-installed
# pyproject.toml declares ranges; CI installs the exact releases recorded here (`make constraints` rewrites it).
CONSTRAINTS := constraints.txt
# torch first, pinned: the CPU wheel is cached on these machines; an unpinned torch pulls GBs of CUDA.
TORCH := torch==2.13.0

# The lowest releases pyproject.toml allows (tests/packaging checks that they match its lower bounds), and what
# lightning 2.4.0 requires below the releases in constraints.txt (fsspec<2026, packaging<25). `make test-min`
# runs the unit and integration tests on them: they sit in .venv-min, which sees .venv's packages (torch,
# pytest, ...) behind its own, so nothing large is installed twice.
MIN_PKGS := boto3==1.36.0 botocore==1.36.0 s3transfer==0.11.0 crc32c==2.4 lightning==2.4.0 \
	fsspec==2025.12.0 packaging==24.2
MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.s3ckpt-installed
# The tests of each tier that also run on moto and at the lowest versions (`portable` tests only on moto).
S3_TIERS := tests/integration tests/reliability tests/distributed

.PHONY: demo test lint typecheck unit test-moto test-min test-packaging constraints bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -c $(CONSTRAINTS) $(TORCH)
	$(PIP) -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/s3ckpt demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Everything on SeaweedFS, then, side by side: the portable tests on moto, unit + integration at the lowest
# supported boto3/botocore/crc32c/Lightning, and the packaging checks (pip's resolver, mostly waiting on PyPI).
test: lint typecheck
	$(PY) -m pytest -q --ignore tests/packaging
	$(MAKE) --no-print-directory -j3 --output-sync=target test-moto test-min test-packaging

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# The tests marked `portable` on moto's standalone S3 server; the others are deselected, and the run says why.
# moto keeps objects in Python memory (~25 MB/s): the 200 MiB round trip stays on SeaweedFS, the multipart
# paths are covered here by the part-boundary tests.
test-moto: $(STAMP)
	S3CKPT_TEST_BACKEND=moto $(PY) -m pytest -q -m "not slow" $(S3_TIERS) \
		--deselect tests/integration/test_transport.py::test_roundtrip_200mib_single_large_write

$(MIN_STAMP): $(STAMP) Makefile
	rm -rf $(MIN_VENV)
	$(PY) -m venv --without-pip $(MIN_VENV)
	site=$$($(MIN_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	$(PIP) --no-deps --target "$$site" $(MIN_PKGS) && \
	echo "import site; site.addsitedir('$$base')" > "$$site/zz_s3ckpt_base.pth"
	# The tests look for weed and the console script next to the interpreter.
	ln -s $(abspath $(VENV))/bin/weed $(MIN_VENV)/bin/weed
	sed '1s|.*|#!$(abspath $(MIN_VENV))/bin/python|' $(VENV)/bin/s3ckpt > $(MIN_VENV)/bin/s3ckpt
	chmod +x $(MIN_VENV)/bin/s3ckpt
	touch $@

# conftest refuses to run unless the versions imported are exactly these (a session header prints them). The
# tests of the embedded server itself and of the backends' capabilities do not depend on these releases.
test-min: $(MIN_STAMP)
	S3CKPT_EXPECT_VERSIONS="$(filter boto3==% botocore==% crc32c==% lightning==%,$(MIN_PKGS))" \
		$(MIN_VENV)/bin/python -m pytest -q -m "not slow" tests/unit tests/integration \
		--ignore tests/integration/test_server.py --ignore tests/integration/test_cli_server.py \
		--ignore tests/integration/test_backend_capabilities.py

# Ranges, constraints and the lower bounds agree; pip resolves s3ckpt beside current s3fs and s3torchconnector.
test-packaging: $(STAMP)
	$(PY) -m pytest -q tests/packaging

# Record the releases of the working .venv as the constraints CI installs with.
constraints: $(STAMP)
	{ sed -n '1,2p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable --all | \
		grep -viE '^(pip|setuptools|wheel|s3ckpt)==' | sed -E 's/^(torch[a-z]*==[^+]+)\+.*/\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# make bench ARGS=--sweep: the defaults sweep first; ARGS="--quick", "--size 1GiB --runs 3", ... (see benchmarks/run.py)
# make bench ARGS=--sharded: the sharded (DCP) benchmark, 1/2/4 ranks, beside the single-file save and the raw floor
# make bench ARGS=--incremental: plain vs incremental saves (base=) of a fine-tuning and a full-training state
bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(PY) -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) $(MIN_VENV) .mypy_cache .ruff_cache .pytest_cache
