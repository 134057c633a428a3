PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check rifle_hf recipes benchmarks tests scripts

test: venv lint
	$(VENV)/bin/pytest -q tests

test-fast: venv
	$(VENV)/bin/pytest -q -m "not slow" tests

demo: venv
	$(PY) recipes/demo.py --output_dir demo_output

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache
