"""Failures that never hang and never lose committed work: kill -9 under torchrun --max-restarts,
engines that fail to start, batch timeouts, resume, refusal of a changed input."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from spmd_dp.testing import (echo_args, expected_rows, journal_batches, launch, make_records, read_jsonl, spmd,
                             wait_for_batches, wait_until, worker_pids, write_jsonl)
from tests.echo_jobs import echo_node, run_echo_workflow


@pytest.mark.slow
@pytest.mark.timing
def test_kill_9_a_rank_mid_run_and_torchrun_restarts_it(tmp_path):
    """Each rank of three killed in turn, rank 0 (the writer) first, once its group has committed 2 batches of its
    own (mid-run: 40 batches in all): one run under --max-restarts=3 that torchrun restarts three times, each
    group resuming from the journal the one before left."""
    records = make_records(240, words=6)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    args = echo_args(tmp_path, inp, "batch_size=6", "engine_options.echo_delay_s=0.01")
    journal = tmp_path / "out" / "out.journal.jsonl"
    proc = launch(args, nproc=3, torchrun_args=["--max-restarts=3"])
    previous: set = set()  # the pids of the group killed last: the next victim is in the group torchrun starts next
    for victim_rank in (0, 2, 1):
        def new_group() -> bool:
            pids = worker_pids(proc.pid)
            return len(pids) == 3 and not previous & set(pids.values())
        assert wait_until(new_group, 120, proc), f"rank {victim_rank}: no new group (torchrun exit {proc.poll()})"
        start = journal_batches(journal)  # the group has resumed (and said so) once it commits batches of its own
        assert wait_until(lambda: journal_batches(journal) >= start + 2, 120, proc), \
            f"rank {victim_rank}: {journal_batches(journal)} batches (torchrun exit {proc.poll()})"
        pids = worker_pids(proc.pid)
        os.kill(pids[victim_rank], signal.SIGKILL)
        previous = set(pids.values())
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("resuming:") == 3, out[-4000:]  # each restarted group found the journal
    # the survivors saw their peer go and left at once: torchrun never had to SIGKILL them after its 30 s (ranks
    # 0 and 1 waited for a dead rank 2 when the pair it watched was never connected: gloo.Group.hello)
    assert "forcefully exiting via 9" not in out, out[-4000:]
    assert "rank 1 stops: rank 2 left without a word" in out, out[-4000:]
    assert read_jsonl(tmp_path / "out" / "out.jsonl") == expected_rows(records)


@pytest.mark.slow
def test_an_engine_that_fails_to_start_leaves_its_share_to_the_others(tmp_path):
    records = make_records(47)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    for schedule in ("static", "dynamic"):
        p = spmd(echo_args(tmp_path, inp, f"schedule={schedule}", "batch_size=5", "overwrite=true",
                           "engine_options.echo_fail_ranks=[1]"), nproc=3, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        assert read_jsonl(tmp_path / "out" / "out.jsonl") == expected_rows(records)
        assert "engine failed to start on rank 1" in p.stderr
        assert "WARNING ranks [1] could not start their engines" in p.stderr
        metrics = json.loads((tmp_path / "out" / "out.metrics.json").read_text())
        assert metrics["ranks"][1]["records"] == 0 and metrics["total"]["failed_ranks"] == [1]


@pytest.mark.timing
def test_no_engine_starts_is_one_line_and_exit_1(tmp_path, records_file):
    t0 = time.monotonic()
    p = spmd(echo_args(tmp_path, records_file, "engine_options.echo_fail_ranks=[0,1,2]"), nproc=3, timeout=120)
    assert time.monotonic() - t0 < 100
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("spmd_dp: error:")]
    assert lines and all("no rank could start its engine" in ln for ln in lines)
    single = spmd(echo_args(tmp_path, records_file, "engine_options.echo_fail_ranks=[0]"), timeout=60)
    assert single.returncode == 1
    assert single.stderr.strip().splitlines()[-1].startswith("spmd_dp: error: no rank could start its engine")


@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.parametrize("nproc", [None, 2])
def test_batch_timeout_names_rank_and_batch_and_keeps_committed_work(tmp_path, nproc):
    records = make_records(40)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    # records 0..19 take 0.2 s (batch: 1 s); 20.. take 2 s each: their batches exceed batch_timeout=4
    slow = [{**r, "prompt": "quick" if i < 20 else "slow " * 10} for i, r in enumerate(records)]
    write_jsonl(inp, slow)
    t0 = time.monotonic()
    # no restart: a rank whose batch is late hands it back and leaves; the batch is late on every rank
    p = spmd(echo_args(tmp_path, inp, "batch_size=5", "batch_timeout=4", "schedule=static",
                       "generation_options.max_tokens=10", "engine_options.echo_delay_s=0.2",
                       "engine_options.max_engine_restarts=0"), nproc=nproc, timeout=120)
    assert time.monotonic() - t0 < 90
    assert p.returncode == 1
    assert "exceeded batch_timeout=4.0s" in p.stderr and "on rank" in p.stderr
    journal = tmp_path / "out" / "out.journal.jsonl"
    assert journal_batches(journal) >= 1  # what was committed stays committed


@pytest.mark.slow
@pytest.mark.timing
def test_resume_after_interruption_and_refusal_of_a_changed_input(tmp_path):
    records = make_records(120)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    args = echo_args(tmp_path, inp, "batch_size=4", "engine_options.echo_delay_s=0.01")
    proc = launch(args, nproc=2)
    journal = tmp_path / "out" / "out.journal.jsonl"
    wait_for_batches(journal, 5, proc)
    os.killpg(os.getpgid(proc.pid), 0)  # still there
    proc.send_signal(signal.SIGKILL)
    for pid in worker_pids(proc.pid).values():
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "out" / "out.jsonl").exists()
    done_before = journal_batches(journal)
    p = spmd(args, nproc=2, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming: {min(120, done_before * 4)} of 120 records committed already" in p.stderr
    assert read_jsonl(tmp_path / "out" / "out.jsonl") == expected_rows(records)
    again = spmd(args, nproc=2, timeout=120)
    assert again.returncode == 0 and "complete already" in again.stderr

    write_jsonl(inp, records[:-1])  # the input changed
    changed = spmd(args, timeout=60)
    assert changed.returncode == 2
    assert "was written for a different run (input_sha256, n_records changed)" in changed.stderr
    assert read_jsonl(tmp_path / "out" / "out.jsonl") == expected_rows(records)  # untouched
    over = spmd([*args, "overwrite=true"], timeout=60)
    assert over.returncode == 0 and read_jsonl(tmp_path / "out" / "out.jsonl") == expected_rows(records[:-1])


@pytest.mark.slow
@pytest.mark.timing
def test_dynamic_beats_static_on_a_skewed_input(tmp_path):
    # the long records sit together at the start: static gives them all to rank 0
    records = [{"id": i, "prompt": ("x " * (30 if i < 16 else 3)).strip()} for i in range(64)]
    nodes = [echo_node(tmp_path, schedule, records, max_tokens=30, schedule=schedule, batch_size=4,
                       engine_options={"echo_delay_s": 0.01}) for schedule in ("static", "dynamic")]
    run = run_echo_workflow(tmp_path, nodes, 2, timeout=120)  # one torchrun (tests/echo_jobs.py), a node each
    assert run.returncode == 0, run.tail()
    busy = {schedule: run.metrics(schedule)["total"]["max_busy_s"] for schedule in ("static", "dynamic")}
    # total work 6.2 s: static's rank 0 has 5.3 s of it, dynamic splits it ~3.1 s each
    print(f"max busy s: {busy}; static / dynamic = {busy['static'] / busy['dynamic']:.2f}")
    assert busy["dynamic"] < 0.8 * busy["static"], busy


@pytest.mark.slow
@pytest.mark.timing
def test_rank0_memory_stays_flat_when_records_grow_10x(tmp_path):
    rss = {}
    for n in (10_000, 100_000):
        inp = write_jsonl(tmp_path / f"d{n}" / "in.jsonl", make_records(n, words=20))
        p = spmd(echo_args(tmp_path, inp, "batch_size=64", "generation_options.max_tokens=20", f"name=n{n}",
                           "log_level=WARNING"), nproc=2, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        rss[n] = json.loads((tmp_path / "out" / f"n{n}.metrics.json").read_text())["total"]["rank0_peak_rss_mb"]
        assert (tmp_path / "out" / f"n{n}.jsonl").stat().st_size > n * 100
    print("rank 0 peak RSS (MB):", rss)
    assert rss[100_000] < 1.25 * rss[10_000], rss


def test_kv_cache_agreement_and_per_rank_sampling(tmp_path):
    records = make_records(24, words=10)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp, "schedule=static", "engine_options.agree_kv_cache=true",
                       "engine_options.cpu_kvcache_space_gib=3", "+generation_options_per_rank.1.max_tokens=7"),
             nproc=2, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    agreed = [ln for ln in p.stderr.splitlines() if "KV cache agreed across 2 ranks" in ln]
    assert len(agreed) == 2 and len({ln.split("] INFO ")[1].split(";")[0] for ln in agreed}) == 1
    rows = read_jsonl(tmp_path / "out" / "out.jsonl")
    # static: records 0..11 on rank 0 (max_tokens=4), 12..23 on rank 1 (its override: 7)
    assert [len(r["out"].split()) for r in rows] == [4] * 12 + [7] * 12
    bad = spmd(echo_args(tmp_path, inp, "+generation_options_per_rank.5.max_tokens=7"), nproc=2, timeout=60)
    # under torchrun each rank exits 2 and torchrun reports it (torchrun itself exits 1)
    assert bad.returncode == 1 and "exitcode  : 2" in bad.stderr
    assert "spmd_dp: config error: generation_options_per_rank names ranks 5 but WORLD_SIZE=2" in bad.stderr


def test_min_agreement_over_real_gloo(tmp_path):
    """Different local budgets on two processes: both end with the smaller. A process forked from a rank
    (as vLLM forks its engine) finds torch.distributed uninitialised: it starts a world of its own."""
    import torch.multiprocessing as mp

    mp.start_processes(_agree_worker, args=(2, str(tmp_path / "store")), nprocs=2, start_method="spawn")
    assert sorted((tmp_path / f"r{r}").read_text() for r in range(2)) == ["0.5 False", "0.5 False"]


def _agree_worker(rank, world, store_path):
    from datetime import timedelta

    import torch.distributed as dist

    from spmd_dp.control.gloo import Group

    group = Group(dist.FileStore(store_path, world), rank, world, timedelta(seconds=60), is_rank0=rank == 0)
    agreed = group.min(0.5 if rank == 1 else 0.9)
    child = os.fork()
    if child == 0:  # what a forked vLLM engine process sees
        Path(store_path).with_name(f"r{rank}").write_text(f"{agreed} {dist.is_initialized()}")
        os._exit(0)
    os.waitpid(child, 0)
