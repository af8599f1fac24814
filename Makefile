# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_EXTRA ?=
PIP := $(PY) -m pip install -q -c constraints.txt $(PIP_EXTRA)

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml adapters/ouroboros-peft/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch
	$(PIP) -e . -e adapters/ouroboros-peft pytest
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) evals/demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
