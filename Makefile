# The two quick-start commands (each sets up the venv first; setup is idempotent):
#   make study      -- run the main job (the whole study) on the embedded default model
#   make test       -- run the test suite (fast + slow, CPU, offline)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup study generate finetune evaluate test test-fast lint bench

setup:
	bash scripts/setup.sh

# the whole study (both corpora, both fine-tuning runs, evaluation, one report): configs/study/default.yaml
study: setup
	$(PY) -m study

generate: setup
	$(PY) -m synthdocs.generate

finetune: setup
	$(VENV)/bin/accelerate launch --config_file configs/finetune/accelerate/cpu.yaml finetune/train.py

evaluate: setup
	$(PY) -m eval.gap

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint:
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_dedup.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_eval.py
