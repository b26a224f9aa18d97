# The two set-up commands a newcomer runs on a fresh clone (see README):
#   make run    creates .venv if missing, installs the package with its cli extra (Lightning,
#               scikit-learn, ...), trains the digits job
#   make test   creates .venv if missing, adds the dev + deepspeed extras, lints, runs the suite
# torch is installed first and pinned by constraints.txt to 2.13.0, the CPU wheel that set-up
# finds locally; installing lightning without it would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
# DeepSpeed JIT-builds its CPU comm op once; keep the build inside the (git-ignored) checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: run test lint pytest test-floors clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch
	$(PIP) -e ".[cli]"
	touch $@

# The two JIT-compiled C++ ops (about a minute each here) are built at set-up, not inside
# whichever test first needs them, where the build counted against that test's timeout:
# dist_bregman's counting kernel (falls back to torch ops, with a warning, without a
# compiler) and DeepSpeed's CPU shared-memory comm op (which DeepSpeed builds when it starts).
$(VENV)/.dev-deps: $(VENV)/.run-deps
	$(PIP) -e ".[cli,dev,deepspeed]"
	$(BIN)/python -c "from dist_bregman import kernels; kernels.extension()"
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
		|| echo "warning: DeepSpeed's CPU comm op did not build; its tests will retry and say why"
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/dist-bregman fit --config configs/digits.yaml

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check dist_bregman tests examples benchmarks
	$(BIN)/mypy

pytest: $(VENV)/.dev-deps
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test: lint pytest

# The suite on the oldest releases pyproject.toml admits (constraints-floors.txt), in its
# own environment. Not part of CI: torch 2.8.0 comes from the package index (on PyPI, its
# multi-GB CUDA build). Without a GPU, triton (which that build pulls in) is removed: DeepSpeed
# imports it and fails to find a driver. The tests comparing FSDP2-over-gloo training with
# one process are expected failures there: torch 2.8's FSDP2 over gloo steps apart by itself
# (tests/helpers/strategies.py, README "Set-up").
FLOORS := .venv-floors
test-floors:
	test -x $(FLOORS)/bin/python || $(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python -m pip install -q -c constraints-floors.txt -e ".[cli,dev,deepspeed]"
	$(FLOORS)/bin/python -c "import torch, sys; sys.exit(torch.cuda.is_available())" \
		&& $(FLOORS)/bin/python -m pip uninstall -y -q triton || true
	TORCH_EXTENSIONS_DIR=$(CURDIR)/build/torch_extensions_floors \
		$(FLOORS)/bin/python -m pytest -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) $(FLOORS) build runs reports .pytest_cache .mypy_cache .ruff_cache
