# overlock-mm developer commands. Every target sets the environment up first (idempotent).
#   make test                 set up .venv and run the test suite
#   make lint                 flake8 (setup.cfg); the test suite runs it too (tests/test_style.py)
#   make demo                 set up, generate the synthetic COCO set, train + evaluate Cascade Mask R-CNN on CPU
#   make benchmark            ContMix op and backbone speed / memory (BENCH_ARGS="--ops --quick" ...)
#   WHEELS=dir make ...       use prebuilt wheels from dir as a cache (e.g. mmcv with ops)
VENV ?= .venv
PY := $(VENV)/bin/python
WHEELS ?=
SETUP_ARGS := $(if $(WHEELS),--find-links $(WHEELS),)
PYTEST_ARGS ?= --durations=30
# sleeping OpenMP waiters: spinning ones stall every op when the cores are shared (tools/train.py)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test lint demo demo-seg demo-cls flops benchmark

setup:
	bash tools/setup_env.sh $(SETUP_ARGS) --venv $(VENV)

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

lint: setup
	$(PY) -m flake8 overlock_mm tools tests configs

flops: setup
	$(PY) tools/analysis/get_flops.py

# ContMix op + backbone speed/memory vs the F.unfold formulation (docs/performance.md);
# e.g. make benchmark BENCH_ARGS="--ops --quick" or BENCH_ARGS="--full --json bench.json"
BENCH_ARGS ?=

benchmark: setup
	$(PY) tools/analysis/benchmark.py $(BENCH_ARGS)

DATA ?= data/demo

demo: setup
	$(PY) tools/demo/run_demo.py det --data-root $(DATA)

demo-seg: setup
	$(PY) tools/demo/run_demo.py seg --data-root $(DATA)

demo-cls: setup
	$(PY) tools/demo/run_demo.py cls --data-root $(DATA)
