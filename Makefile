# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; torch==2.13.0 goes in first so that
# the package's torch range is satisfied by the CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cryosplat-installed

.PHONY: install test demo bench bench-all clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# lint and type-check first (seconds), then the tests
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/cryosplat demo --out demo_out --force

# quick benchmarks (minutes on 2 CPU cores); bench-all adds the long ones (hours on CPU)
bench: $(STAMP)
	$(PY) benchmarks/info_star.py
	$(PY) benchmarks/render.py --boxes 128 --gaussians 2000 10000

bench-all: bench
	$(PY) benchmarks/render.py
	$(PY) benchmarks/baseline.py
	$(PY) benchmarks/reconstruct.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
