"""The project's scripts, run from the repository root: `python -m scripts.bench ...` (the benchmarks),
`python scripts/fault_injection.py` (faults at random moments, many times over). They share spmd_dp/testing.py
with the tests."""
