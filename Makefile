# gem-bench. `make help` lists the targets.
SHELL := /bin/bash
PY ?= .venv/bin/python
export GEM_BENCH_DATA ?= $(abspath ../shared/data/hub)
export TOKENIZERS_PARALLELISM := false

.PHONY: help setup demo test test-full bench bench-ci report slurm-up slurm-down clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch first, pinned: here pip takes the CPU build from the machine's disk; on a GPU machine
	# PyPI's default build of the same version is the CUDA one. Either satisfies pyproject's range.
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e ".[dev]"
	touch $@

setup: .venv/.installed  ## create .venv and install everything (idempotent)

demo: setup  ## SmolLM2-135M on SST-2: GEM vs random masking vs full fine-tuning (CPU profile, ~10 min)
	$(PY) scripts/demo.py

test: setup  ## the fast test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow" --timeout 900

test-full: setup  ## every test, including real-model and long ones
	$(PY) -m pytest -q --timeout 3600

bench: setup  ## speed and memory benchmark on the embedded default -> results/bench/
	$(PY) -m gem_bench.bench --name cpu-smollm2

bench-ci: setup  ## the short benchmark variant
	$(PY) -m gem_bench.bench --name ci --short

report: setup  ## tables and figures from results/runs
	$(PY) -m gem_bench.cli report

slurm-up:  ## start the single-node Slurm cluster from ../shared/tools/slurm-local
	bash ../shared/tools/slurm-local/start_slurm.sh

slurm-down:
	bash ../shared/tools/slurm-local/stop_slurm.sh

clean:
	rm -rf outputs multirun .pytest_cache
