# Every target bootstraps .venv first, from the lock: the exact versions CI tested. A second
# run reinstalls nothing unless pyproject.toml or the lock changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK := requirements/lock-py$(PYVER).txt
TORCH_CPU := torch==2.13.0
# Where `make lock` finds the torch CPU wheel, so the lock holds its dependencies and not the
# CUDA libraries of PyPI's Linux build (torch itself stays out of the lock: see venv).
TORCH_WHEELS ?= /opt/wheels
LATEST := .venv-latest
PIP := -m pip install --quiet --disable-pip-version-check
# Tests mostly wait on subprocesses and Dask start-ups: more workers than cores pays.
PYTEST_WORKERS ?= 3

.PHONY: venv lock test-latest demo topics test test-quick lint import-graph bench bench-memory clean

venv: $(STAMP)

# $(1): a venv's bin folder. Keep a torch that is already there (a CUDA build on a GPU
# machine); otherwise install $(TORCH_CPU): the CPU wheel where pip finds it (this machine's
# wheel folder), PyPI's CUDA build on a CUDA machine.
define torch
	@if $(1)/python -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(1)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		$(1)/python $(PIP) "$(TORCH_CPU)"; \
	fi
endef

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call torch,$(BIN))
	@# The lock is the whole dependency closure but torch: --no-deps installs exactly it.
	$(BIN)/python $(PIP) --no-deps -r $(LOCK)
	$(BIN)/python $(PIP) --no-deps -e .
	$(BIN)/python -m pip check --disable-pip-version-check
	touch $(STAMP)

$(LOCK):
	@echo "no lock for Python $(PYVER): run 'make lock' (or PYTHON=python3.11 make ...)" >&2
	@exit 1

# Refresh the lock to the newest releases that pyproject.toml's ranges allow.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python $(PIP) uv
	mkdir -p requirements
	echo "$(TORCH_CPU)" | $(BIN)/uv pip compile pyproject.toml --extra dev --constraint - \
		--python-version $(PYVER) --no-emit-package torch --upgrade --quiet \
		$(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS)) \
		--custom-compile-command "make lock" -o $(LOCK)
	@if grep -Eq '^(nvidia-|triton==|cuda-)' $(LOCK); then \
		echo "$(LOCK) pins CUDA libraries: set TORCH_WHEELS to a folder holding the $(TORCH_CPU) CPU wheel" >&2; \
		exit 1; fi
	@echo "$(LOCK): $$(grep -c '==' $(LOCK)) packages pinned"

# The suite against the newest releases (torch stays as installed), in its own venv.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(call torch,$(LATEST)/bin)
	$(LATEST)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(LATEST)/torch.txt
	$(LATEST)/bin/python $(PIP) --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip list --disable-pip-version-check | grep -Ei '^(transformers|kernels|dask|torch) '
	$(LATEST)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

demo: $(STAMP)
	$(BIN)/lepton-batch submit jobs/quickstart.yaml

topics: $(STAMP)
	$(BIN)/lepton-batch submit jobs/topics.yaml

# docs/import-graph.svg, from the code (tests/test_layers.py checks it is current)
import-graph:
	$(PYTHON) tools/import_graph.py

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15

# The edit loop: everything not marked slow, no ruff.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow"

bench: $(STAMP)
	$(BIN)/lepton-batch bench

bench-memory: $(STAMP)
	$(BIN)/python benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) $(LATEST) out .pytest_cache
