# Two commands for a fresh machine: `make demo` (the main job on the built-in synthetic world)
# and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bldseg-installed
# Standard peers (segmentation_models_pytorch, timm) live in their own venv: they need
# torchvision, which the registry serves only as a CUDA build (it runs on the CPU too).
PEERS  ?= .venv-peers
PEERS_STAMP := $(PEERS)/.bldseg-installed

.PHONY: demo test test-all lint format build-ops bench bench-quality bench-train clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,geo,cluster]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bldseg.ops.build
	$(PY) experiments/tune_aug.py

# Two pytest workers (pytest-xdist), each test file on one worker so its module fixtures (the
# trained tiny models) are made once, each computing with one thread (tests/conftest.py): about
# 12 minutes on 2 cores (744 s on a Xeon, 2026-12-07), bound by the tests of Ray searches.
# `make test TESTFLAGS=` runs them one by one.
TESTFLAGS ?= -n 2 --dist loadfile --durations=25

test: $(STAMP)
	$(PY) -m pytest -q $(TESTFLAGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(TESTFLAGS) -m "slow or not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

build-ops: $(STAMP)
	$(PY) -m bldseg.ops.build

$(PEERS_STAMP): pyproject.toml
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PEERS)/bin/python -m pip install -q -e ".[smp]"
	touch $(PEERS_STAMP)

# The demo's best trial vs an smp UNet through the same pipeline (tens of minutes).
bench-quality: $(PEERS_STAMP)
	$(PEERS)/bin/python -m bldseg.ops.build
	$(PEERS)/bin/python experiments/bench_quality.py --json bench/quality.json $(ARGS)

bench-train: $(PEERS_STAMP)
	$(PEERS)/bin/python -m bldseg.ops.build
	$(PEERS)/bin/python experiments/bench_train.py --json bench/train.json $(ARGS)

bench: $(STAMP)
	$(PY) experiments/bench_data.py --json bench/data.json
	$(PY) experiments/bench_dcnv3.py --json bench/dcnv3.json
	$(PY) experiments/bench_ensemble.py --json bench/ensemble.json

clean:
	rm -rf $(VENV) $(PEERS) data/cache .pytest_cache .ruff_cache
