"""Real torchrun, real gloo, the echo engine: output complete and ordered, the seed's log lines. The runs are shared
(tests/echo_jobs.py): one torchrun per number of ranks, of a workflow whose nodes are the tests' jobs; each test reads
its node."""

import re

import pytest

from spmd_dp.testing import echo_args, make_records, spmd, write_jsonl
from tests.echo_jobs import echo_node, run_echo_workflow

RECORDS, SPLIT, FEW = make_records(61), make_records(33), make_records(2)


def nodes(folder, nproc):
    """static and dynamic over 61 records (batch_size 8) on any number of ranks; on 4, also 33 records (static, the
    default batch_size) and 2 records (fewer than the ranks) under static and dynamic."""
    out = [echo_node(folder, s, RECORDS, schedule=s, batch_size=8) for s in ("static", "dynamic")]
    if nproc == 4:
        out += [echo_node(folder, "split", SPLIT, schedule="static"),
                echo_node(folder, "few_static", FEW, schedule="static"),
                echo_node(folder, "few_dynamic", FEW, schedule="dynamic")]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The shared run of `nproc` ranks, made on first use."""
    made = {}

    def get(nproc):
        if nproc not in made:
            folder = tmp_path_factory.mktemp(f"echo{nproc}")
            made[nproc] = run_echo_workflow(folder, nodes(folder, nproc), nproc)
        return made[nproc]
    return get


def check_output(rows, records, name="out", words=4):
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # complete, in input order, each key once
    for got, rec in zip(rows, records):
        assert got["prompt"] == rec["prompt"]
        assert got[name] == " ".join(rec["prompt"].split()[:words])


@pytest.mark.parametrize("nproc", [1, 2, 4])
@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_torchrun_echo(runs, nproc, schedule):
    run = runs(nproc)
    assert run.returncode == 0, run.tail()
    check_output(run.rows(schedule), RECORDS, schedule)
    assert f"[rank 0/{nproc} " in run.log and f"Starting {nproc} data parallel workers" in run.log
    log = run.section(schedule)
    for r in range(nproc):
        assert re.search(rf"\[rank {r}/{nproc} .*Worker rank {r} is ready", log)
    received = re.findall(r"Received results for batch (\d+) from rank (\d+)", log)
    assert sorted(int(b) for b, _ in received) == list(range(8))  # 61 records / 8 = 8 batches, each once
    assigned = [int(n) for n in re.findall(r"Assigned (\d+) prompts to rank \d+", log)]
    assert sum(assigned) == 61
    metrics = run.metrics(schedule)
    assert metrics["total"]["records"] == 61 and len(metrics["ranks"]) == nproc
    assert sum(r["records"] for r in metrics["ranks"]) == 61
    assert metrics["total"]["output_tokens"] == 61 * 4


def test_seed_split_logged_under_static(runs):
    run = runs(4)
    log = run.section("split")
    for r, n in enumerate([9, 8, 8, 8]):
        assert f"Assigned {n} prompts to rank {r}\n" in log
    check_output(run.rows("split"), SPLIT, "split")


def test_ranks_without_records_take_part_and_finish(runs):
    run = runs(4)
    assert run.returncode == 0, run.tail()
    for schedule in ("static", "dynamic"):
        check_output(run.rows(f"few_{schedule}"), FEW, f"few_{schedule}")
    assert "Assigned 0 prompts to rank 3" in run.section("few_static")


@pytest.mark.slow
def test_python_m_and_torchrun_give_the_same_file(tmp_path):
    records = make_records(45, words=9)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    single = spmd(echo_args(tmp_path, inp, "batch_size=4", name="single"))
    assert single.returncode == 0, single.stderr[-3000:]
    multi = spmd(echo_args(tmp_path, inp, "batch_size=4", name="multi"), nproc=3)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = (tmp_path / "out" / "single.jsonl").read_text().replace('"single":', '"X":')
    b = (tmp_path / "out" / "multi.jsonl").read_text().replace('"multi":', '"X":')
    assert a == b and a.count("\n") == 45
