"""The launch scripts for real: one node (run_local.sh) and two torchrun agents forming one world
over a c10d rendezvous on localhost (run_multinode.sh), as two nodes would."""

import socket
import subprocess
import sys

from spmd_dp.testing import REPO, clean_env, echo_args, make_records, read_jsonl, spmd, write_jsonl


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
