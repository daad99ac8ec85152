# The README's two commands are `make demo` and `make test`; both set up .venv first.
SHELL := /bin/bash
PY := .venv/bin/python
CONFIG ?= configs/tiny.yaml

.PHONY: setup demo test clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m cdp_rec.cli gen-data --config $(CONFIG)
	$(PY) -m cdp_rec.cli train --config $(CONFIG)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf data runs .pytest_cache
