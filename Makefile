# spmd_dp on a machine without GPUs. `make run` and `make test` set everything up first.
VENV ?= .venv
NPROC ?= 2
TEST_WORKERS ?= 4  # make test: pytest-xdist processes (the vLLM tests in one, the Slurm tests in one); 4 on 2 cores:
                   # the tests wait on runs and timeouts, and 2 left the cores idle ~24 % of the time
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast clean

setup:
	bash scripts/setup_cpu.sh $(VENV)

# The main job: 2 ranks over the bundled sample dataset with the embedded tiny model (real vLLM on CPU).
# OMP_NUM_THREADS=1 is what torchrun sets for its ranks anyway; set here, torchrun prints no banner about it.
run: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/torchrun --nproc-per-node=$(NPROC) --rdzv-endpoint=localhost:0 \
	    --rdzv-backend=c10d -m spmd_dp $(ARGS)

# Every test: pure logic, config, real torchrun over gloo, real vLLM on CPU (about 10 min measured on 2 cores, CPU-bound).
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The quick tests: no real vLLM, no Slurm, none marked slow (over ~10 s) or timing-dependent (pyproject.toml's markers).
# Still ~550 tests, many of them short torchrun runs: minutes, not one.
test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not vllm and not slurm and not slow and not timing" $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
