"""The run's metrics (spmd_dp/status/metrics.py) and rank 0's progress lines (progress.py), from RankStats: totals,
the generation span across ranks, the imbalance of the ranks that generated, failed ranks named with when and why."""

import json
import logging

from spmd_dp.control.messages import RankStats
from spmd_dp.status.metrics import Metrics
from spmd_dp.status.progress import Progress


def test_totals_span_and_imbalance():
    m = Metrics(3)
    m.add_rank(RankStats(0, records=10, batches=2, output_tokens=100, busy_s=4.0, gen_start_unix=1000.0,
                         gen_end_unix=1004.0, engine_restarts=1))
    m.add_rank(RankStats(1, records=6, batches=1, output_tokens=60, busy_s=2.0, gen_start_unix=1001.0,
                         gen_end_unix=1005.0))
    m.add_rank(RankStats(2, engine_failed="no GPU"))  # never generated: not in the imbalance
    report = m.report()
    t = report.total
    assert (t["records"], t["batches"], t["output_tokens"], t["engine_restarts"]) == (16, 3, 160, 1)
    assert t["generation_s"] == 5.0 and t["generation_tokens_per_s"] == 32.0  # first claim to last batch, all ranks
    assert t["imbalance"] == round(4.0 / 3.0, 4) and t["max_busy_s"] == 4.0 and t["failed_ranks"] == [2]
    data = json.loads(report.to_json())
    assert data["ranks"][0]["output_tokens_per_s"] == 25.0 and data["total"] == t
    table = report.table()
    assert "restarts 1" in table and "engine failed at start: no GPU" in table and "imbalance 1.333" in table


def test_a_rank_that_failed_mid_run_says_when():
    m = Metrics(1)
    m.add_rank(RankStats(0, engine_failed="engine died", failed_at_unix=m.started_unix + 12.5, handed_back=3))
    report = m.report()
    assert report.ranks[0].failed_at_s == 12.5
    assert "(+12.5s): engine died (handed back 3 batches)" in report.table()


def test_progress_lines_off_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="spmd_dp")
    p = Progress(10, every_s=3600)
    p.update(4, 40)  # not yet time for a line
    assert "progress:" not in caplog.text
    p.update(6, 60)  # done: always a line
    assert "progress: 10/10 records (100.0%)" in caplog.text and "ETA 0m00s" in caplog.text
    p.close()
