# Every target bootstraps .venv first; a second run reinstalls nothing unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0

.PHONY: venv demo topics test lint bench bench-memory clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Keep a torch that is already there (a CUDA build on a GPU machine); otherwise pin the
	@# CPU wheel before the project is installed, so no multi-GB CUDA build is pulled in.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA machine: installing torch from the project's range"; \
	else \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_CPU)"; \
	fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lepton-batch submit jobs/quickstart.yaml

topics: $(STAMP)
	$(BIN)/lepton-batch submit jobs/topics.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/lepton-batch bench

bench-memory: $(STAMP)
	$(BIN)/python benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) out .pytest_cache
