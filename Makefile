# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Each sets up what it needs: a virtualenv in .venv, PyTorch, the package, the demo model.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of PyTorch on this kind of machine (pip finds the 2.13.0 CPU wheel on local disk).
# On a CUDA machine:  make TORCH_SPEC="torch>=2.5" ...
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup model demo test test-slow test-all lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

model: setup
	$(VENV)/bin/cosine models pull

demo: model
	$(VENV)/bin/cosine demo

test: model
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: model
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-all: model
	$(PY) -m pytest $(PYTEST_ARGS)

# Style (ruff) and layering (import-linter's contracts in pyproject.toml; also a default test).
lint: setup
	$(VENV)/bin/ruff check cosine workers tests bench
	$(VENV)/bin/lint-imports

bench: model
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/target.py
	$(PY) bench/verify_cost.py

clean:
	rm -rf $(VENV) build *.egg-info
