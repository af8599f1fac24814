# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
# Everything is installed into .venv from the pinned set in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip options, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu" on a machine
# without the local CPU torch wheel.
PIP_EXTRA ?=
PIP := $(PY) -m pip install -q -c constraints.txt $(PIP_EXTRA)
# One installable distribution per host framework.
ADAPTERS := $(sort $(dir $(wildcard adapters/*/pyproject.toml)))

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml $(addsuffix pyproject.toml,$(ADAPTERS)) constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch
	$(PIP) -e . $(foreach a,$(ADAPTERS),-e $(a)) pytest
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) evals/demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
