"""The harness tests and scripts share (spmd_dp/testing.py), on real files and processes: the command lines, the
environment without a launcher's variables, what the echo engine writes, counting a run's committed batches in
either output mode (a torn last line included), keys lost or doubled, bounded waits."""

import subprocess
import sys
import time

from spmd_dp.launch.launcher import TORCHRUN_VARS
from spmd_dp.testing import (clean_env, expected_rows, journal_batches, keys_report, make_records, running,
                             torchrun_command, wait_until, write_jsonl)


def test_command_lines():
    assert torchrun_command(["a=1"]) == [sys.executable, "-m", "spmd_dp", "a=1"]
    cmd = torchrun_command(["a=1"], 3, ["--max-restarts=1"])
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3"]
    assert "--rdzv-endpoint=localhost:0" in cmd and cmd[-4:] == ["--max-restarts=1", "-m", "spmd_dp", "a=1"]
    fixed = torchrun_command(["a=1"], 2, master_port=29610)
    assert "--master-port=29610" in fixed and not any(c.startswith("--rdzv") for c in fixed)


def test_the_environment_has_no_launcher_variables(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.setenv(var, "1")
    env = clean_env({"EXTRA": "x"})
    assert not set(TORCHRUN_VARS) & set(env) and env["EXTRA"] == "x" and env["PYTHONUNBUFFERED"] == "1"


def test_what_the_echo_engine_writes():
    records = make_records(2, words=6)
    assert records[1] == {"id": "r00001", "prompt": "w1_0 w1_1 w1_2 w1_3 w1_4 w1_5"}
    assert expected_rows(records, "res", words=2)[1] == {**records[1], "res": "w1_0 w1_1"}


def test_committed_batches_in_either_mode_and_a_torn_line(tmp_path):
    journal = tmp_path / "out.journal.jsonl"
    assert journal_batches(journal) == 0  # not there yet
    journal.write_text('{"fingerprint": {}}\n'
                       '{"part": "p0", "batches": [[0, 4, 0, 10], [4, 8, 10, 10]]}\n'
                       '{"shards": [[8, 12, "s", 1, 2, 4, null]]}\n'
                       '{"shards": [[12, 16, "t"')  # a line still being written
    assert journal_batches(journal) == 3


def test_keys_lost_and_doubled(tmp_path):
    out = write_jsonl(tmp_path / "out.jsonl", [{"id": "a"}, {"id": "b"}, {"id": "b"}, {"id": "z"}])
    assert keys_report(out, ["a", "b", "c"]) == {"lost": 1, "duplicated": 1}
    assert keys_report(tmp_path / "none.jsonl", ["a"]) == {"lost": 1, "duplicated": 0}


def test_waits_are_bounded_and_end_with_the_run():
    t0 = time.monotonic()
    assert not wait_until(lambda: False, 0.2)
    assert wait_until(lambda: time.monotonic() - t0 > 0.1, 5)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert not wait_until(lambda: False, 60, proc)  # the run ended: no point waiting on
    assert time.monotonic() - t0 < 30


def test_running_ends_the_run_whatever_happens():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with running(proc, grace_s=10):
            raise KeyError("a failed assertion, say")
    except KeyError:
        pass
    assert proc.poll() == -15  # SIGTERM
