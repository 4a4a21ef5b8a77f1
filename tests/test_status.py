"""What a run tells about itself, end to end (real torchrun, gloo, the echo engine; a real HTTP scrape): the live
status file while it runs, Prometheus metrics on metrics_port, `python -m spmd_dp.status` for a running, a finished
and a killed job, and the timeline picture of a run with an engine restart and of a drained run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from spmd_dp.testing import REPO, clean_env, echo_args, launch, make_records, running, wait_for_batches, \
    worker_pids, write_jsonl
from tests.echo_jobs import echo_node, run_echo_workflow
from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timing]  # runs over seconds, a kill at a moment

SLOW = ("batch_size=16", "engine_options.echo_delay_s=0.01")  # 600 records: ~12 s on 2 ranks


def status_cli(*args):
    return subprocess.run([sys.executable, "-m", "spmd_dp.status", *map(str, args)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=60)


def metrics(text):
    """Prometheus text format -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def committed_records(journal):
    """Records the journal commits (read here, apart from spmd_dp's own reader)."""
    spans = {}
    for line in journal.read_text().splitlines()[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        for row in entry.get("batches", []) + entry.get("shards", []):
            spans[row[0]] = row[1]
    return sum(b - a for a, b in spans.items())


def test_live_status_a_prometheus_scrape_and_the_status_command_during_a_run(tmp_path):
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", make_records(600, words=8))
    port = free_port()
    path = tmp_path / "out" / "out.status.json"
    seen, scraped, shown = [], None, None
    with running(launch(echo_args(tmp_path, inp, *SLOW, f"metrics_port={port}"), nproc=2, log=tmp_path / "log")) as p:
        deadline = time.monotonic() + 240
        while p.poll() is None and time.monotonic() < deadline:
            try:
                s = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                s = None
            if s is not None and s["phase"] == "generating" and s["records"]["done"] > 0:
                seen.append((s["records"]["done"], s["eta_s"], s["updated_unix"]))
                if scraped is None:
                    scraped = metrics(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                             timeout=10).read().decode())
                elif shown is None:
                    shown = status_cli(tmp_path / "out")
            time.sleep(0.3)
        assert p.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-3000:]
    dones = [d for d, _, _ in seen]
    assert len(set(u for _, _, u in seen)) >= 2, seen  # rewritten while it ran
    assert dones == sorted(dones) and dones[-1] > dones[0], seen  # done grows
    assert all(eta is not None and 0 <= eta < 3600 for _, eta, _ in seen), seen  # a finite ETA
    # the scrape: the same figures, over HTTP, while the run was going
    assert scraped['spmd_dp_phase{name="out",phase="generating"}'] == 1.0
    assert 0 < scraped['spmd_dp_records_done{name="out"}'] < 600 and scraped['spmd_dp_records_total{name="out"}'] == 600
    assert scraped['spmd_dp_output_tokens_total{name="out"}'] > 0
    for r in (0, 1):
        assert scraped[f'spmd_dp_rank_state{{name="out",rank="{r}",state="generating"}}'] == 1.0
        assert scraped[f'spmd_dp_rank_last_heartbeat_timestamp_seconds{{name="out",rank="{r}"}}'] > time.time() - 300
    # the command, while it ran
    assert shown is not None and shown.returncode == 0, shown
    assert "out in " in shown.stdout and ": generating; rank 0 is pid" in shown.stdout, shown.stdout
    assert "ETA" in shown.stdout and "    1  " in shown.stdout  # a row per rank
    # the end
    final = json.loads(path.read_text())
    assert final["phase"] == "done" and not final["running"] and final["records"]["done"] == 600
    assert [r["state"] for r in final["ranks"]] == ["done", "done"]
    assert sum(r["records"] for r in final["ranks"]) == 600 and all(r["host"] for r in final["ranks"])
    after = status_cli(tmp_path / "out", "out")
    assert after.returncode == 0 and "out in " in after.stdout and ": done; ended" in after.stdout
    assert "nothing is running" in after.stdout and "records 600 / 600 (100.0 %)" in after.stdout
    with pytest.raises(OSError):  # the server is gone with the run
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_after_kill_9_of_the_whole_job_the_status_says_not_running_with_the_committed_count(tmp_path):
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", make_records(600, words=8))
    journal = tmp_path / "out" / "out.journal.jsonl"
    with running(launch(echo_args(tmp_path, inp, *SLOW), nproc=2, log=tmp_path / "log")) as p:
        assert wait_for_batches(journal, 6, p) >= 6, (tmp_path / "log").read_text()[-3000:]
        time.sleep(2.5)  # a status written since
        pids = worker_pids(p.pid)
        assert sorted(pids) == [0, 1]
        for pid in [p.pid, *pids.values()]:  # the whole job: torchrun and its ranks
            os.kill(pid, signal.SIGKILL)
        p.wait(timeout=30)
    for pid in pids.values():
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and b"Z" not in _state(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert json.loads((tmp_path / "out" / "out.status.json").read_text())["phase"] == "generating"  # its last word
    committed = committed_records(journal)
    assert 0 < committed < 600
    shown = status_cli(tmp_path / "out")
    assert shown.returncode == 0, shown.stderr
    head = shown.stdout.splitlines()[0]
    assert f"NOT RUNNING (its rank 0 (pid {pids[0]} on {socket.gethostname()}) is gone" in head, shown.stdout
    assert f"the journal has {committed} of 600 records committed; rerun with the same output_dir to resume" in head
    as_json = json.loads(status_cli(tmp_path / "out", "--json").stdout)
    assert as_json["running"] is False and as_json["records"]["done"] == committed
    assert sum(r["records"] for r in as_json["ranks"]) == committed  # per rank, from the journal


def _state(pid):
    try:
        return open(f"/proc/{pid}/stat", "rb").read().split(b")")[-1][:3]
    except OSError:
        return b"Z"


def red_pixels(png, rgb, tol=12):
    """Pixels of the PNG within `tol` of the colour `rgb`."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    return int((np.abs(img - np.array(rgb, dtype=np.int16)) <= tol).all(axis=2).sum())


RESTART_RED, DRAIN_PURPLE = (0xd6, 0x27, 0x28), (0x7b, 0x32, 0x94)


def test_the_timeline_of_a_plain_run_a_run_with_an_engine_restart_and_a_drained_run(tmp_path):
    pytest.importorskip("matplotlib")
    records = make_records(400, words=8)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    # plain, then fault: one torchrun (tests/echo_jobs.py), a node each
    nodes = [echo_node(tmp_path, name, records, batch_size=16, engine_options={"echo_delay_s": 0.003, **faults})
             for name, faults in (("plain", {}), ("fault", {"echo_fault_ranks": [1], "echo_fault_after_steps": 40}))]
    run = run_echo_workflow(tmp_path, nodes, 2)
    assert run.returncode == 0, run.tail()
    out = tmp_path / "out"
    for name in ("plain", "fault"):
        png = out / f"{name}.timeline.png"
        assert f"timeline: {png}" in run.section(name) and png.stat().st_size > 10_000
    assert "restarting it on the same slice" in run.section("fault")
    assert red_pixels(out / "fault.timeline.png", RESTART_RED) > 50  # the restart drawn (and in the legend)
    assert red_pixels(out / "plain.timeline.png", RESTART_RED) == 0
    events = [json.loads(x) for x in (out / "fault.events.jsonl").read_text().splitlines()]
    assert [e["rank"] for e in events if e["event"] == "restarting"] == [1]
    # from the files alone, as for any run with a journal
    again = status_cli(out, "fault", "--plot", tmp_path / "again.png")
    assert again.returncode == 0 and (tmp_path / "again.png").stat().st_size > 10_000, again.stderr
    assert red_pixels(tmp_path / "again.png", RESTART_RED) > 50
    # a drained run: SIGTERM mid-run
    with running(launch(echo_args(tmp_path, inp, "batch_size=16", "engine_options.echo_delay_s=0.01", name="drained"),
                        nproc=2, log=tmp_path / "drained.log")) as p:
        assert wait_for_batches(out / "drained.journal.jsonl", 4, p) >= 4
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    log = (tmp_path / "drained.log").read_text()
    assert "stopped by SIGTERM after draining" in log, log[-3000:]
    assert red_pixels(out / "drained.timeline.png", DRAIN_PURPLE) > 50 and \
        red_pixels(out / "plain.timeline.png", DRAIN_PURPLE) == 0
    status = json.loads((out / "drained.status.json").read_text())
    assert status["phase"] == "drained" and status["reason"] == "stopped by SIGTERM"
    assert [r["state"] for r in status["ranks"]] == ["drained", "drained"]
