"""The launch scripts for real: one node (run_local.sh) and two torchrun agents forming one world
over a c10d rendezvous on localhost (run_multinode.sh), as two nodes would."""

import signal
import socket
import subprocess
import sys

import pytest

from spmd_dp.testing import REPO, clean_env, echo_args, make_records, read_jsonl, spmd, wait_for_batches, write_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(args, nnodes=2, nproc=2, taskset=None, timeout=600):
    """Start NNODES agents of scripts/run_multinode.sh at once, like one per node; return their outputs."""
    port = free_port()
    procs = []
    for node in range(nnodes):
        env = clean_env({"PYTHON": sys.executable, "NNODES": str(nnodes), "NODE_RANK": str(node),
                         "NPROC_PER_NODE": str(nproc), "RDZV_ID": f"test{port}"})
        cmd = ["bash", "scripts/run_multinode.sh", "engine_options.dp_master_ip=127.0.0.1",
               f"engine_options.dp_master_port={port}", *args]
        if taskset:
            cmd = ["taskset", "-c", taskset[node], *cmd]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def test_two_agents_form_one_world_echo(tmp_path):
    records = make_records(77, words=7)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    single = spmd(echo_args(tmp_path, inp, "batch_size=5", name="one"))
    assert single.returncode == 0, single.stderr[-3000:]
    codes, outs = launch_nodes(echo_args(tmp_path, inp, "batch_size=5", name="multi"))
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    log = "".join(outs)
    assert "Starting 4 data parallel workers" in log
    for r in range(4):
        assert f"Worker rank {r} is ready" in log
    one = read_jsonl(tmp_path / "out" / "one.jsonl")
    multi = read_jsonl(tmp_path / "out" / "multi.jsonl")
    assert [r["one"] for r in one] == [r["multi"] for r in multi] and len(multi) == 77


def test_run_local_script(tmp_path):
    records = make_records(20)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    env = clean_env({"PYTHON": sys.executable, "NPROC_PER_NODE": "2"})
    p = subprocess.run(["bash", "scripts/run_local.sh", *echo_args(tmp_path, inp)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Starting 2 data parallel workers" in p.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")] == [r["id"] for r in records]


@pytest.mark.slow
@pytest.mark.timing
def test_launch_scripts_exit_with_the_ranks_code(tmp_path):
    """torchrun exits 1 whatever its ranks did; the launch scripts pass the ranks' code on (issue 25)."""
    records = make_records(200)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    env = clean_env({"PYTHON": sys.executable, "NPROC_PER_NODE": "2"})
    bad = subprocess.run(["bash", "scripts/run_local.sh", *echo_args(tmp_path, inp, "batch_size=0")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-3000:]  # bad config: every rank exits 2
    assert "spmd_dp: config error: batch_size=0 is not allowed" in bad.stderr
    assert "ChildFailedError" in bad.stderr  # torchrun's own summary is still there
    args = echo_args(tmp_path, inp, "batch_size=5", "engine_options.echo_delay_s=0.02")
    proc = subprocess.Popen(["bash", "scripts/run_local.sh", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for_batches(tmp_path / "out" / "out.journal.jsonl", 3, proc) >= 3
        proc.send_signal(signal.SIGTERM)  # to the script: what a scheduler or `kill` sends
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]  # the ranks drained (torchrun alone exits 1)
    assert "spmd_dp: stopped by SIGTERM after draining" in out and "Traceback" not in out, out[-3000:]


def test_ranks_code_is_rank_0s_else_the_first_failure_else_torchruns():
    from spmd_dp.launch.torchrun import ranks_code

    assert ranks_code({0: 143, 1: 143}, 143) == 143
    assert ranks_code({0: 0, 1: 0}, 0) == 0
    assert ranks_code({0: 2, 1: 2}, 1) == 2
    assert ranks_code({0: 0, 1: 1, 2: 2}, 1) == 1
    assert ranks_code({1: 0}, 1) == 1  # rank 0 left no code (killed): torchrun's own
    assert ranks_code({}, 143) == 143
