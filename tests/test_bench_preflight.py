"""python -m scripts.bench preflight end to end on the echo engine (no timing asserted: the table is the benchmark's):
preflight then the real run at N = 2 (N = 1 is the same code with one rank: tests/test_preflight.py), the results
table, and the projected output tokens of a workload with a skewed max_tokens equal to the run's (the max_tokens
of every record are counted, not sampled)."""

import json
import subprocess
import sys

import pytest

from spmd_dp.testing import REPO, clean_env

pytestmark = pytest.mark.slow  # a benchmark end to end (~30 s)


def test_the_benchmark_runs_preflight_then_the_run_and_tabulates_them(tmp_path):
    p = subprocess.run([sys.executable, "-m", "scripts.bench", "preflight", "--suite", "echo", "--out", str(tmp_path),
                        "--prompts", "600", "--ns", "2"],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["workload"], r["ranks"]) for r in rows] == [("uniform", 2), ("skewed", 2)]
    for r in rows:
        assert r["projected_generation_s"] > 0 and r["actual_generation_s"] > 0
        assert r["projected_output_tokens"] == r["actual_output_tokens"]  # ignore_eos: every max_tokens is used
        assert len(r["sample_per_rank"]) == r["ranks"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| workload | ranks |") and len(table) == 2 + len(rows)
