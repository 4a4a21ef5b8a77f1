# spmd_dp on a machine without GPUs. `make run` and `make test` set everything up first.
VENV ?= .venv
NPROC ?= 2
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast clean

setup:
	bash scripts/setup_cpu.sh $(VENV)

# The main job: 2 ranks over the bundled sample dataset with the embedded tiny model (real vLLM on CPU).
# OMP_NUM_THREADS=1 is what torchrun sets for its ranks anyway; set here, torchrun prints no banner about it.
run: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/torchrun --nproc-per-node=$(NPROC) --rdzv-endpoint=localhost:0 \
	    --rdzv-backend=c10d -m spmd_dp $(ARGS)

# Every test: pure logic, config, real torchrun over gloo, real vLLM on CPU.
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The same without the real-vLLM and Slurm tests: pure logic, config, and the echo engine under real torchrun.
# Still ~400 tests, most of which start real processes: many minutes, not one (~10 on 2 free cores).
test-fast: setup
	$(PY) -m pytest -q -m "not vllm and not slurm" $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
