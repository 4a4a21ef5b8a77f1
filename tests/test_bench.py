"""A tiny smoke of the benchmark suite (the figures themselves come from real runs, in docs/)."""

import json
import subprocess
import sys

from spmd_dp.testing import REPO


def test_echo_phase_and_report(tmp_path):
    p = subprocess.run([sys.executable, "scripts/bench.py", "--suite", "cpu", "--out", str(tmp_path), "--phases",
                        "echo", "--echo-records", "3000"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("scaling_efficiency", "overhead_n1", "startup_extra_s", "skew_speedup_dynamic_vs_static",
                "skew_vs_ideal", "rank0_peak_rss_mb"):
        assert key in res
    assert set(res["rank0_peak_rss_mb"]) == {"300", "3000"} and all(v > 0 for v in res["rank0_peak_rss_mb"].values())
    assert res["environment"]["torch"] and res["workload"]["model"] == "spmd-dp/small-llama"


def test_report_figures_from_phase_results(tmp_path):
    def job(label, method, n, tps, gen, startup, busy, workload="uniform", schedule="dynamic"):
        return {"label": label, "method": method, "n": n, "g": 1, "workload": workload, "schedule": schedule,
                "records": 100, "tokens_per_s": tps, "gen_s": gen, "startup_s": startup, "busy_s": busy,
                "imbalance": max(busy) / (sum(busy) / len(busy)), "output_tokens": int(tps * gen)}
    jobs = [job("a_raw_n1", "raw", 1, 1000, 10.0, 30.0, [10.0]),
            job("d_dynamic_n1", "spmd", 1, 990, 10.1, 32.0, [10.1]),
            job("d_dynamic_n1_bsall", "spmd", 1, 1000, 10.0, 32.0, [10.0]),
            job("d_dynamic_n2", "spmd", 2, 1960, 5.1, 33.0, [5.0, 5.1]),
            job("b_dp_example_n2_sorted", "dp_example", 2, 600, 9.0, 30.0, [9.0, 3.0], "sorted", "static"),
            job("d_dynamic_n2_sorted", "spmd", 2, 900, 6.0, 31.0, [6.0, 5.8], "sorted")]
    (tmp_path / "phase-x.json").write_text(json.dumps({"jobs": jobs, "suite": "cpu", "workload": {"model": "m"},
                                                       "environment": {}}))
    p = subprocess.run([sys.executable, "scripts/bench.py", "report", "--out", str(tmp_path / "r"), str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["scaling_efficiency"] == {"1": 0.99, "2": 0.98}
    assert res["overhead_n1"] == 0.01 and res["startup_extra_s"] == 2.0 and res["batch32_vs_all"] == 0.99
    assert res["skew_speedup_dynamic_vs_static"] == {"sorted": 1.5}
    assert res["skew_vs_ideal"] == {"sorted": round(6.0 / 5.9, 4)}
    assert (tmp_path / "r" / "results.md").read_text().startswith("| run |")


def test_scan_suite_smoke(tmp_path):
    """bench.py scan end to end on a small input, with the current code standing in for the baseline tree."""
    p = subprocess.run([sys.executable, "scripts/bench.py", "scan", "--out", str(tmp_path), "--records", "3000",
                        "--ranks", "1", "--repeat", "1", "--base-tree", str(REPO)], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "scan.json").read_text())
    summary = res["sizes"][0]["summary"]
    assert set(summary) == {"in:today", "in:new_one_file", "in:new_shards", "today_n1", "new_one_n1", "new_shards_n1"}
    assert summary["new_shards_n1"]["scan_s"]["min"] > 0 and summary["in:new_one_file"]["wall_s"]["min"] > 0
    assert summary["new_one_n1"]["scan_cpu_s"]["min"] > 0
    assert all(summary[k]["launch_to_first_request_s"]["min"] > 0 for k in summary if not k.startswith("in:"))
    assert len(list((tmp_path / "workloads" / "shards-3000").iterdir())) == 16
    assert "| 3000 |" in (tmp_path / "scan.md").read_text()
