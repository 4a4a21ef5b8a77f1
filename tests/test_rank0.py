"""Rank 0's role without any process group: open (scan + journal), handle messages, finish, resume."""

import json

from spmd_dp.config import load_config
from spmd_dp.engines.base import Completion
from spmd_dp.control.messages import BatchDone, RankStats
from spmd_dp.control.local import LocalGroup
from spmd_dp.node import Node, open_node
from spmd_dp.output.files import json_line
from spmd_dp.output.rows import output_row
from spmd_dp.plan import RankPlan
from spmd_dp.rank0 import Rank0
from spmd_dp.testing import make_records, read_jsonl, write_jsonl


def rank0(tmp_path, records, *overrides, world=2):
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    cfg = load_config([f"data_dir={inp.parent}", "input_data_path=in.jsonl", f"output_dir={tmp_path / 'out'}",
                       "name=t", "inference_engine=echo", "batch_size=4", *overrides])
    plan = RankPlan.build(cfg, {"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
                                "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    return Rank0(Node.build(cfg, plan))


def open_(r0):
    """open_node on a world of one: the scan, then Rank0.open; returns the WorkOrder."""
    index, _, order = open_node(r0.node, LocalGroup(), r0, None)
    if index is not None:
        index.close()
    return order


def done(records, start, stop, rank=1):
    lines = [json_line(output_row(r, "t", Completion("", [r["prompt"].split()[0]]), None)) for r in records[start:stop]]
    return BatchDone(start // 4, start, stop, rank, lines, output_tokens=stop - start)


def test_open_handle_finish(tmp_path):
    records = make_records(10)
    r0 = rank0(tmp_path, records)
    order = open_(r0)
    assert order.error is None and not order.complete and order.pending == [(0, 10)]
    assert (tmp_path / "out" / "t.config.yaml").exists()
    r0.handle([done(records, 4, 8), RankStats(1, records=4, batches=1, output_tokens=4)])
    r0.handle([done(records, 0, 4, rank=0), done(records, 8, 10, rank=0), RankStats(0, records=6, batches=2)])
    r0.finish()
    r0.close()
    rows = read_jsonl(tmp_path / "out" / "t.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # input order, whoever sent what
    metrics = json.loads((tmp_path / "out" / "t.metrics.json").read_text())
    assert [r["records"] for r in metrics["ranks"]] == [6, 4] and metrics["total"]["records"] == 10


def test_resume_and_complete(tmp_path):
    records = make_records(10)
    r0 = rank0(tmp_path, records)
    open_(r0)
    r0.handle([done(records, 4, 8)])
    r0.close()  # a crash before the end: one batch committed
    again = rank0(tmp_path, records)
    order = open_(again)
    assert order.pending == [(0, 4), (8, 10)]
    again.handle([done(records, 0, 4), done(records, 8, 10)])
    again.finish()
    again.close()
    third = open_(rank0(tmp_path, records))
    assert third.complete and third.pending == []


def test_bad_input_and_unwritable_output_become_one_line(tmp_path):
    order = open_(rank0(tmp_path, [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}]))
    assert order.error.startswith("input error:") and "duplicate primary key 1" in order.error
    (tmp_path / "blocked").write_text("a file, not a folder")
    r0 = rank0(tmp_path, make_records(3), f"output_dir={tmp_path / 'blocked'}")
    order = open_(r0)
    assert order.error.startswith("output error:") and "is a writable directory" in order.error


def test_a_drained_run_says_what_was_committed_and_a_gave_up_rank_when_and_why(tmp_path, caplog):
    import signal
    import time

    import pytest

    from spmd_dp.control.drain import Drain
    from spmd_dp.errors import Drained

    records = make_records(10)
    r0 = rank0(tmp_path, records)
    open_(r0)
    r0.handle([done(records, 0, 4, rank=0), RankStats(0, records=4, batches=1)])
    gave_up = RankStats(1, engine_failed="engine died (x) after 2 restarts", failed_at_unix=time.time(),
                        engine_restarts=2, handed_back=1)
    r0.handle([gave_up])
    drain = Drain(5.0)
    drain.request(signal.SIGTERM, "SIGTERM")
    with pytest.raises(Drained, match=r"stopped by SIGTERM after draining: 4 of 10 records committed \(4 in this "
                                      r"run\), 6 to go; rerun with the same output_dir to resume") as stopped:
        r0.finish(drain)
    r0.close()
    assert stopped.value.code == 143
    assert not (tmp_path / "out" / "t.jsonl").exists()
    metrics = json.loads((tmp_path / "out" / "t.metrics.json").read_text())
    assert metrics["total"]["complete"] is False and metrics["total"]["failed_ranks"] == [1]
    row = metrics["ranks"][1]
    assert row["engine_failed"].startswith("engine died") and 0 <= row["failed_at_s"] < 60
    assert row["engine_restarts"] == 2 and row["handed_back"] == 1
    table = r0.metrics.report().table()
    assert "restarts 2  engine failed at " in table and "(handed back 1 batches)" in table
    assert "ranks [1] stopped generating mid-run (rank 1 at +" in caplog.text
