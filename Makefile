# Two commands for a fresh machine: `make demo` (the main job on the built-in synthetic world)
# and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bldseg-installed

.PHONY: demo test test-all lint format build-ops bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,geo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bldseg.ops.build
	$(PY) experiments/tune_aug.py

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

build-ops: $(STAMP)
	$(PY) -m bldseg.ops.build

bench: $(STAMP)
	$(PY) experiments/bench_data.py --json bench/data.json
	$(PY) experiments/bench_dcnv3.py --json bench/dcnv3.json
	$(PY) experiments/bench_ensemble.py --json bench/ensemble.json

clean:
	rm -rf $(VENV) data/cache .pytest_cache .ruff_cache
