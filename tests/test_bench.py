"""The benchmarks (scripts/bench/, `python -m scripts.bench`): their figures computed from known inputs, and a tiny
end-to-end run of the suite's echo phase, the scan and the scale benchmark. The figures themselves come from real
runs, in docs/; nothing here asserts a speed."""

import json
import subprocess
import sys

import pytest

from scripts.bench.__main__ import parser
from scripts.bench.report import markdown, report
from scripts.bench.scale import per_batch, scale_markdown
from scripts.bench.scan import scan_markdown
from scripts.bench.tail import tail_figures, tail_markdown
from spmd_dp.testing import REPO, clean_env

BENCH = REPO / "docs" / "bench"


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "scripts.bench", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_one_cli_with_a_subcommand_per_benchmark():
    sub = next(a for a in parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"suite", "raw", "report", "scan", "tail", "scale", "gpu-session", "gpu-verify", "images",
                                "prefix", "preflight"}
    p = bench("suite", "tpu", "--out", "x", timeout=60)
    assert p.returncode == 2 and "invalid choice: 'tpu'" in p.stderr  # argparse's one line, no run started


@pytest.mark.parametrize("results,table,make", [
    ("cpu-run1/results.json", "cpu-run1/results.md", markdown), ("cpu-scan/scan-1m.json", "cpu-scan/scan-1m.md",
                                                                 scan_markdown),
    ("cpu-scan/scan-10m.json", "cpu-scan/scan-10m.md", scan_markdown), ("cpu-tail/tail.json", "cpu-tail/tail.md",
                                                                       tail_markdown),
    ("cpu-scale/scale.json", "cpu-scale/scale.md", scale_markdown)])
def test_the_tables_in_docs_are_made_from_their_results(results, table, make):
    """The committed raw results make the committed tables, byte for byte: the report formats docs/ cites."""
    assert make(json.loads((BENCH / results).read_text())) == (BENCH / table).read_text()


def test_the_report_and_the_gpu_verification_table_from_committed_results(tmp_path):
    p = bench("report", "--out", str(tmp_path / "r"), str(BENCH / "cpu-run1"), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "results.json").read_text()) == \
        json.loads((BENCH / "cpu-run1" / "results.json").read_text())
    p = bench("gpu-verify", "--out", str(tmp_path / "v.md"), "docs/bench/gpu-4xh200", "docs/bench/gpu-4xh200-fork",
              timeout=120)  # the folders as the doc names them (relative to the repository)
    assert p.returncode == 0, p.stderr[-2000:]
    made = (tmp_path / "v.md").read_text()
    assert (REPO / "docs" / "gpu-verification.md").read_text().startswith(made)  # its first two sections


@pytest.mark.slow
def test_echo_phase_and_report(tmp_path):
    p = bench("suite", "cpu", "--out", str(tmp_path), "--phases", "echo", "--echo-records", "3000")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    # only the echo phase ran: no throughput figure is made up from jobs that did not run
    assert res["jobs"] == {} and res["scaling_efficiency"] == {} and res["skew_vs_ideal"] == {}
    assert res["overhead_n1"] is None and res["startup_extra_s"] is None and res["batch32_vs_all"] is None
    assert set(res["rank0_peak_rss_mb"]) == {"300", "3000"} and all(v > 0 for v in res["rank0_peak_rss_mb"].values())
    assert all(v > 0 for v in res["merge_mb_per_s"].values())
    echo = {e["records"]: e for e in res["echo"]}
    assert echo[3000]["exit_code"] == 0 and echo[3000]["output_bytes"] > 3000 * 1000  # ~1 KB of output a record
    assert res["environment"]["torch"] and res["workload"]["model"] == "spmd-dp/small-llama"
    assert f"`rank0_peak_rss_mb`: {json.dumps(res['rank0_peak_rss_mb'])}" in (tmp_path / "results.md").read_text()


def _job(label, method, n, tps, gen, startup, busy, workload="uniform", schedule="dynamic"):
    return {"label": label, "method": method, "n": n, "g": 1, "workload": workload, "schedule": schedule,
            "records": 100, "tokens_per_s": tps, "gen_s": gen, "startup_s": startup, "busy_s": busy,
            "imbalance": max(busy) / (sum(busy) / len(busy)), "output_tokens": int(tps * gen)}


def test_report_figures_from_phase_results(tmp_path):
    jobs = [_job("a_raw_n1", "raw", 1, 1000, 10.0, 30.0, [10.0]),
            _job("d_dynamic_n1", "spmd", 1, 990, 10.1, 32.0, [10.1]),
            _job("d_dynamic_n1_bsall", "spmd", 1, 1000, 10.0, 32.0, [10.0]),
            _job("d_dynamic_n2", "spmd", 2, 1960, 5.1, 33.0, [5.0, 5.1]),
            _job("b_dp_example_n2_sorted", "dp_example", 2, 600, 9.0, 30.0, [9.0, 3.0], "sorted", "static"),
            _job("d_dynamic_n2_sorted", "spmd", 2, 900, 6.0, 31.0, [6.0, 5.8], "sorted")]
    (tmp_path / "phase-x.json").write_text(json.dumps({"jobs": jobs, "suite": "cpu", "workload": {"model": "m"},
                                                       "environment": {}}))
    p = bench("report", "--out", str(tmp_path / "r"), str(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["scaling_efficiency"] == {"1": 0.99, "2": 0.98}
    assert res["overhead_n1"] == 0.01 and res["startup_extra_s"] == 2.0 and res["batch32_vs_all"] == 0.99
    assert res["skew_speedup_dynamic_vs_static"] == {"sorted": 1.5}
    assert res["skew_vs_ideal"] == {"sorted": round(6.0 / 5.9, 4)}
    assert (tmp_path / "r" / "results.md").read_text().startswith("| run |")
    assert (tmp_path / "r" / "throughput_vs_n.png").stat().st_size > 0


def test_a_failed_job_is_left_out_of_the_figures(tmp_path):
    jobs = [_job("a_raw_n1", "raw", 1, 1000, 10.0, 30.0, [10.0]),
            {**_job("d_dynamic_n2", "spmd", 2, 1960, 5.1, 33.0, [5.0, 5.1]), "error": "exit 1"}]
    (tmp_path / "phase-x.json").write_text(json.dumps({"jobs": jobs, "suite": "cpu", "workload": {},
                                                       "environment": {}}))
    res = report(tmp_path / "r", [tmp_path])
    assert list(res["jobs"]) == ["a_raw_n1"] and res["scaling_efficiency"] == {}


def _rank(rank, start, end, busy, tokens, records=10):
    return {"rank": rank, "gen_start_unix": start, "gen_end_unix": end, "busy_s": busy, "output_tokens": tokens,
            "records": records}


def test_tail_span_against_its_ideal():
    # two ranks, the second starting 2 s late: ideal = (busy 8 + 6, plus the 2 s offset) / 2 = 8; span 10
    fig = tail_figures({"ranks": [_rank(0, 100.0, 108.0, 8.0, 800), _rank(1, 102.0, 110.0, 6.0, 600)]})
    assert (fig["span_s"], fig["ideal_s"], fig["span_vs_ideal"]) == (10.0, 8.0, 1.25)
    assert fig["start_s"] == [0.0, 2.0] and fig["tokens_per_s"] == 140.0
    assert fig["work_max_vs_mean"] == round(800 / 700, 4)
    table = tail_markdown({"runs": {"arm": [{**fig, "label": "arm_0"}, {"label": "arm_1", "error": "x"}],
                                    "broken": [{"error": "x"}]}, "load_before": [1.0], "load_after": [2.0]})
    assert "| arm | 1 | 1.25 | 10.0 | [10, 10] |" in table and "| broken | 1 | failed |" in table


def test_scale_figures_per_batch():
    run = {"ranks": 2, "mode": "sharded", "batches": 100, "batches_per_rank": 50, "gen_cpu_s": 2.0,
           "rank0_cpu_s": 1.5, "rank0_role_cpu_s": 0.5, "span_s": 12.0, "ideal_s": 10.0, "output_bytes": 1_000_000,
           "rss_mb_mean": 100.0, "rss_mb_max": 120.0, "rank0_rss_mb": 120.0, "claims": 200, "claim_s": 0.1}
    fig = per_batch(run, batch_size=8)
    assert fig["cpu_ms_per_batch"] == 20.0 and fig["rank0_cpu_ms_per_batch"] == 5.0  # its role, not its own batches
    assert fig["wall_overhead_ms_per_batch"] == 40.0 and fig["span_vs_ideal"] == 1.2
    assert fig["rank0_ceiling_batches_per_s"] == 200.0 and fig["rank0_ceiling_records_per_s"] == 1600
    assert fig["bytes_per_batch"] == 10_000 and fig["claim_ms"] == 0.5
    assert per_batch({"error": "x", "ranks": 2, "mode": "single"}, 8) == {"error": True, "ranks": 2, "mode": "single"}


@pytest.mark.slow
def test_scan_suite_smoke(tmp_path):
    """The scan end to end on a small input, with the current code standing in for the baseline tree."""
    p = bench("scan", "--out", str(tmp_path), "--records", "3000", "--ranks", "1", "--repeat", "1",
              "--base-tree", str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "scan.json").read_text())
    summary = res["sizes"][0]["summary"]
    assert set(summary) == {"in:today", "in:new_one_file", "in:new_shards", "today_n1", "new_one_n1", "new_shards_n1"}
    assert summary["new_shards_n1"]["scan_s"]["min"] > 0 and summary["in:new_one_file"]["wall_s"]["min"] > 0
    assert summary["new_one_n1"]["scan_cpu_s"]["min"] > 0
    assert all(summary[k]["launch_to_first_request_s"]["min"] > 0 for k in summary if not k.startswith("in:"))
    assert len(list((tmp_path / "workloads" / "shards-3000").iterdir())) == 16
    assert "| 3000 |" in (tmp_path / "scan.md").read_text()


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    """Two echo ranks, two batches each, in both output modes: the CPU sampler saw every rank, the per-batch
    figures are made from them, and the output itself is not kept."""
    p = bench("scale", "--out", str(tmp_path), "--ranks", "2", "--batches", "2", "--delay", "0.001",
              "--store-clients", "")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "scale.json").read_text())
    runs = {r["mode"]: r for r in res["runs"]}
    assert set(runs) == {"single", "sharded"}
    for run in runs.values():
        assert run["exit_code"] == 0 and run["records"] == 2 * 2 * 8 and run["batches"] == 4
        assert run["sampled_ranks"] == 2 and run["output_bytes"] > 0
    assert [r["mode"] for r in res["per_batch"]["new"]] == ["single", "sharded"]
    assert not list(tmp_path.glob("runs/*/out.jsonl")) and not list(tmp_path.glob("runs/*/out/"))
    assert "| new | sharded | 2 |" in (tmp_path / "scale.md").read_text()
