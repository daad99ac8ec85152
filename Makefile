# The README's two commands are `make demo` and `make test`; both set up .venv first.
SHELL := /bin/bash
PY := .venv/bin/python
CONFIG ?= configs/tiny.yaml

.PHONY: setup demo test clean gpu-check

# DEVICE=cuda: .venv-cuda from the CUDA lock (requirements/cuda.txt); scripts/gpu_check.sh uses it.
DEVICE ?= cpu

setup:
	@DEVICE=$(DEVICE) bash scripts/setup.sh

demo: setup
	$(PY) -m cdp_rec.cli gen-data --config $(CONFIG)
	$(PY) -m cdp_rec.cli train --config $(CONFIG)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf data runs .pytest_cache

# On a GPU machine: install the CUDA lock and run every CUDA check (scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh
