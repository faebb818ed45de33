# The two quick-start commands (each sets up the venv first; setup is idempotent):
#   make generate   -- run the main job on the embedded default model
#   make test       -- run the test suite (fast + slow, CPU, offline)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup generate test test-fast lint bench

setup:
	bash scripts/setup.sh

generate: setup
	$(PY) -m synthdocs.generate

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint:
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_generate.py
