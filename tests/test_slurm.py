"""Slurm for real: a one-node cluster (munged, slurmctld, slurmd) started for this module by
scripts/slurm/start_test_cluster.sh, then `sbatch scripts/slurm.sbatch` (torchrun per node, or
srun tasks), `srun --ntasks=2 python -m spmd_dp` without torchrun, and a job requeued twice
mid-run (`scontrol requeue`, then the USR1 the script gets before a time limit) that resumes
from its journal and finishes with every key exactly once. The echo engine: no model.

Needs root and Debian's slurm-wlm + munge (`.ci/run` installs them); skipped where they are
not installed, except under CI, where that is a failure. The parsing of Slurm's environment
(nodelists, tasks per node, which step) is tested without a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from spmd_dp.launch.launcher import TORCHRUN_VARS, RankEnv, _expand_nodelist, _expand_tasks_per_node
from spmd_dp.errors import UsageError
from spmd_dp.testing import REPO, echo_args, journal_batches, make_records, read_jsonl, write_jsonl

SBATCH = REPO / "scripts" / "slurm.sbatch"
START = REPO / "scripts" / "slurm" / "start_test_cluster.sh"
STOP = REPO / "scripts" / "slurm" / "stop_test_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


# -- Slurm's environment, parsed (no cluster) ------------------------------------------------------

def test_nodelist_and_tasks_per_node_forms():
    assert _expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert _expand_nodelist("node-[8-10]-ib") == ["node-8-ib", "node-9-ib", "node-10-ib"]
    assert _expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(UsageError, match="SLURM_STEP_TASKS_PER_NODE"):
        _expand_tasks_per_node("two")


def _step(**kw) -> Dict[str, str]:
    env = {"SLURM_JOB_ID": "777", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NUM_NODES": "1",
           "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_JOB_NODELIST": "n1"}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def test_uneven_step_takes_this_nodes_task_count():
    # 5 tasks on 2 nodes: 3 on the first, 2 on the second; rank 4 is local rank 1 of 2 on node 1
    env = _step(SLURM_PROCID=4, SLURM_LOCALID=1, SLURM_NODEID=1, SLURM_STEP_NUM_TASKS=5, SLURM_NTASKS=5,
                SLURM_STEP_NUM_NODES=2, SLURM_STEP_TASKS_PER_NODE="3,2", SLURM_STEP_NODELIST="n[1-2]",
                SLURM_JOB_NODELIST="n[1-2]")
    e = RankEnv.from_environ(env)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (4, 1, 5, 2)
    assert e.master_addr == "n1" and e.master_port == 20777 and e.launcher == "slurm"


def test_one_node_step_needs_no_name_resolution_and_dp_master_wins():
    e = RankEnv.from_environ(_step(SLURM_STEP_NUM_TASKS=2, SLURM_STEP_TASKS_PER_NODE=2,
                                   SLURM_STEP_NODELIST="unresolvable-host"), dp_master_port=4321)
    assert (e.master_addr, e.master_port, e.local_world_size) == ("127.0.0.1", 4321, 2)
    e = RankEnv.from_environ(_step(SLURM_STEP_NUM_TASKS=4, SLURM_STEP_NUM_NODES=2, SLURM_STEP_TASKS_PER_NODE="2(x2)",
                                   SLURM_STEP_NODELIST="n[1-2]"), dp_master_ip="10.1.2.3")
    assert e.master_addr == "10.1.2.3"


@pytest.mark.parametrize("step", [None, "batch", "4294967294", "extern", "4294967290"])
def test_batch_script_and_special_steps_are_one_process(step):
    # The batch script sees SLURM_PROCID=0 and the job's SLURM_NTASKS but is no task of a step.
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
           "SLURM_TASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "n1"}
    if step is not None:
        env["SLURM_STEP_ID"] = step
    e = RankEnv.from_environ(env)
    assert (e.launcher, e.world_size) == ("single", 1)


def test_requeue_count_namespaces_the_store():
    e = RankEnv.from_environ(_step(SLURM_RESTART_COUNT=2))
    assert e.restart_count == 2 and e.store_prefix == "spmd_dp/slurm777.0/restart2"


# -- scripts/slurm.sbatch's command line, with stand-ins for srun and scontrol (no cluster) ---------

def _dry_sbatch(tmp_path: Path, env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run the batch script as Slurm would on the batch host, with srun printing its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\n"\n')
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE", "NPROC", "GPUS_PER"))}
    full = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "SLURM_JOB_ID": "4242",
            "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_CPUS_ON_NODE": "32", **env}
    return subprocess.run(["bash", str(SBATCH), *args], env=full, capture_output=True, text=True, timeout=60)


def _srun_argv(p: subprocess.CompletedProcess) -> List[str]:
    assert p.returncode == 0, p.stderr
    return [line[4:] for line in p.stdout.splitlines() if line.startswith("ARG ")]


def test_sbatch_one_torchrun_per_node_one_rank_per_gpu_slice(tmp_path):
    argv = _srun_argv(_dry_sbatch(tmp_path, {"SLURM_GPUS_ON_NODE": "8", "PYTHON": sys.executable},
                                  "engine_options.gpus_per_dp_rank=2", "name=x y"))
    assert argv[:5] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=1"]
    assert argv[5:] == [sys.executable, "-m", "spmd_dp.launch.torchrun", "--nnodes=2", "--nproc-per-node=4",
                        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:24242", "--rdzv-id=4242", "--max-restarts=0",
                        "-m", "spmd_dp", "engine_options.gpus_per_dp_rank=2", "name=x y"]


@pytest.mark.parametrize("env,nproc", [
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "4"),                     # GPUs from what is visible
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "GPUS_PER_DP_RANK": "4"}, "1"),
    ({}, "1"),                                                        # no GPU: one rank per node
    ({"SLURM_NTASKS_PER_NODE": "3"}, "3"),                           # ... or sbatch --ntasks-per-node
    ({"SLURM_GPUS_ON_NODE": "8", "NPROC_PER_NODE": "5", "RDZV_PORT": "1234", "MAX_RESTARTS": "3"}, "5"),
])
def test_sbatch_ranks_per_node_from_the_allocation(tmp_path, env, nproc):
    argv = _srun_argv(_dry_sbatch(tmp_path, env))
    assert f"--nproc-per-node={nproc}" in argv
    if "RDZV_PORT" in env:
        assert "--rdzv-endpoint=gpu07:1234" in argv and "--max-restarts=3" in argv


def test_sbatch_gpus_per_rank_and_rendezvous_from_env_or_overrides(tmp_path):
    argv = _srun_argv(_dry_sbatch(tmp_path, {"SLURM_GPUS_ON_NODE": "8", "GPUS_PER_DP_RANK": "4"}, "x=1"))
    assert "--nproc-per-node=2" in argv and argv[-2:] == ["engine_options.gpus_per_dp_rank=4", "x=1"]
    argv = _srun_argv(_dry_sbatch(tmp_path, {}, "engine_options.dp_master_ip=10.0.0.9",
                                  "engine_options.dp_master_port=29999"))
    assert "--rdzv-endpoint=10.0.0.9:29999" in argv
    p = _dry_sbatch(tmp_path, {"GPUS_PER_DP_RANK": "2"}, "engine_options.gpus_per_dp_rank=4")
    assert p.returncode == 2 and "GPUS_PER_DP_RANK=2 but engine_options.gpus_per_dp_rank=4" in p.stderr


def test_sbatch_srun_launcher_and_errors(tmp_path):
    argv = _srun_argv(_dry_sbatch(tmp_path, {"LAUNCHER": "srun", "SLURM_GPUS_ON_NODE": "4", "PYTHON": sys.executable},
                                  "a=1"))
    assert argv[:3] == ["--nodes=2", "--ntasks=8", "--ntasks-per-node=4"]
    assert argv[-4:] == [sys.executable, "-m", "spmd_dp", "a=1"]
    p = _dry_sbatch(tmp_path, {"SLURM_GPUS_ON_NODE": "2"}, "engine_options.gpus_per_dp_rank=4")
    assert p.returncode == 2 and "2 GPUs on the node but engine_options.gpus_per_dp_rank=4" in p.stderr
    p = _dry_sbatch(tmp_path, {"SLURM_JOB_ID": ""})
    assert p.returncode != 0 and "run this script with sbatch" in p.stderr


# -- a real cluster --------------------------------------------------------------------------------

def _slurm_env(conf: Path) -> Dict[str, str]:
    """This process's environment for Slurm commands: our cluster's config, no outer job or torchrun."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
           and k not in TORCHRUN_VARS}
    env.update(SLURM_CONF=str(conf), PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    return env


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
               if shutil.which(exe) is None]
    why = None
    if missing:
        why = f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge"
    elif os.geteuid() != 0:
        why = "the test cluster's slurmd must run as root"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must run the Slurm tests: .ci/run installs slurm-wlm and munge)")
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", str(START), str(d)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"the test cluster did not start:\n{p.stdout}\n{p.stderr}"
    env = _slurm_env(d / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(STOP), str(d)], capture_output=True, text=True, timeout=120)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            assert not (d / pid_file).exists(), f"{pid_file} left behind: a daemon may still run"


def job_info(env: Dict[str, str], job: str) -> Dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(env: Dict[str, str], job: str, timeout: float = 150, on_pending=None) -> Dict[str, str]:
    """Poll `scontrol show job` (no accounting here) until the job is in a final state.

    Faster than `sbatch --wait`, whose polling backs off to 32 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job)
        state = info.get("JobState", "")
        if state in FINAL_STATES:
            print(f"slurm job {job}: JobState={state} ExitCode={info.get('ExitCode')} "
                  f"Restarts={info.get('Restarts')} RunTime={info.get('RunTime')}")
            return info
        if state == "PENDING" and on_pending:
            on_pending(info)
        time.sleep(0.3)
    subprocess.run(["scancel", job], env=env, timeout=30)
    raise AssertionError(f"job {job} did not end in {timeout:.0f}s: {job_info(env, job)}")


def sbatch(env: Dict[str, str], cwd: Path, args: List[str], sbatch_args: List[str] = (),
           extra_env: Dict[str, str] | None = None) -> str:
    p = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(SBATCH), *args], cwd=cwd,
                       env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def start_now(env: Dict[str, str], info: Dict[str, str]) -> None:
    """A requeued job waits 120 s (Reason=BeginTime) before it may start again; cut the wait to 2 s.

    Not to 0: slurmd refuses a job credential issued in the same second as the old run's kill
    ("Job credential revoked": it compares whole seconds), and the job then ends FAILED 1:0."""
    if info.get("Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={info['JobId']}", "StartTime=now+2"], env=env,
                       capture_output=True, timeout=30)


def daemon_logs(env: Dict[str, str], lines: int = 40) -> str:
    """The last lines of slurmctld's and slurmd's logs: why Slurm ended or failed a job."""
    log_dir = Path(env["SLURM_CONF"]).parent / "log"
    return "\n".join(f"--- {name}:\n" + "\n".join(
        (log_dir / name).read_text(errors="replace").splitlines()[-lines:])
        for name in ("slurmctld.log", "slurmd.log") if (log_dir / name).exists())


def check_output(out_dir: Path, records, name="out", words=4):
    rows = read_jsonl(out_dir / f"{name}.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # complete, in input order, each key once
    assert all(got[name] == " ".join(rec["prompt"].split()[:words]) for got, rec in zip(rows, records))
    assert [p.name for p in out_dir.glob("*.config.yaml")] == [f"{name}.config.yaml"]
    assert "inference_engine: echo" in (out_dir / f"{name}.config.yaml").read_text()
    assert not (out_dir / f"{name}.parts").exists() or not any((out_dir / f"{name}.parts").iterdir())


@pytest.mark.slurm
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_sbatch_runs_across_the_allocation(slurm, tmp_path, launcher):
    records = make_records(200)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    job = sbatch(slurm, tmp_path, echo_args(tmp_path, inp, "batch_size=16"), ["--ntasks-per-node=2"],
                 {"LAUNCHER": launcher})
    info = wait_job(slurm, job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    check_output(tmp_path / "out", records)
    assert f"slurm.sbatch: job {job} (restart 0) on 1 node(s)" in log
    assert f"2 rank(s) per node ({launcher})" in log
    assert "Starting 2 data parallel workers" in log
    how = "torchrun" if launcher == "torchrun" else "slurm"
    for r in range(2):
        assert re.search(rf"\[rank {r}/2 [^\]]*\] INFO rank {r}/2 \(local {r}/2, {how}\)", log), log[-3000:]
    assert log.count("] INFO wrote ") == 1
    assert "step ended with exit code 0" in log


@pytest.mark.slurm
def test_sbatch_failure_is_the_jobs_exit_state(slurm, tmp_path):
    """A bad input fails the job (JobState=FAILED, non-zero exit code) with one clear line in its log."""
    job = sbatch(slurm, tmp_path, echo_args(tmp_path, tmp_path / "data" / "missing.jsonl"))
    info = wait_job(slurm, job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert info["Restarts"] == "0"  # --requeue requeues on preemption or node failure, not on a failed run
    assert re.search(r"spmd_dp: input error: .*missing\.jsonl", log), log[-3000:]
    assert "step ended with exit code 2" in log  # the ranks' code (bad input), not torchrun's 1
    assert not (tmp_path / "out" / "out.jsonl").exists()


@pytest.mark.slurm
def test_srun_without_torchrun(slurm, tmp_path):
    records = make_records(200)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = subprocess.run(["srun", "--ntasks=2", "--kill-on-bad-exit=1", sys.executable, "-m", "spmd_dp",
                        *echo_args(tmp_path, inp, "batch_size=16", "schedule=static")],
                       cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=180)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    check_output(tmp_path / "out", records)
    assert "[rank 0/2 " in log and "[rank 1/2 " in log
    for r in range(2):
        assert re.search(rf"\[rank {r}/2 [^\]]*\] INFO rank {r}/2 \(local {r}/2, slurm\)", log), log[-3000:]
        assert re.search(rf"Worker rank {r} is ready", log)
    assert "Starting 2 data parallel workers" in log
    # both ranks did work that reached rank 0 (the static schedule: each rank has its share whenever its engine is up;
    # under the dynamic one a rank that starts late under load may find every batch taken)
    assert re.search(r"Received results for batch \d+ from rank 1 ", log)
    metrics = json.loads((tmp_path / "out" / "out.metrics.json").read_text())
    assert sum(r["records"] for r in metrics["ranks"]) == 200


@pytest.mark.slurm
def test_requeued_job_resumes_and_finishes_each_key_once(slurm, tmp_path):
    """Requeued twice mid-run, by hand (`scontrol requeue`) and by the USR1 a time limit brings
    (`--signal=B:USR1@120`, here sent with scancel): three runs, every key exactly once."""
    records = make_records(200)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    # 2 ranks x 100 records x 4 words x 0.04 s: 16 s of generation in all, plus ~8 s of startup per run
    job = sbatch(slurm, tmp_path, echo_args(tmp_path, inp, "batch_size=16", "engine_options.echo_delay_s=0.04"),
                 ["--ntasks-per-node=2"])
    journal = tmp_path / "out" / "out.journal.jsonl"
    log_path = tmp_path / f"slurm-{job}.out"

    def wait_for(cond, what, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = job_info(slurm, job)
            if info.get("JobState") in FINAL_STATES:
                raise AssertionError(f"job ended before {what}: {info}\n{log_path.read_text()[-3000:]}")
            start_now(slurm, info)
            if cond(info):
                return info
            time.sleep(0.2)
        raise AssertionError(f"no {what} in {timeout}s: {job_info(slurm, job)}")

    wait_for(lambda i: journal_batches(journal) >= 1, "first committed batch")
    first = journal_batches(journal)
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True, timeout=30)
    wait_for(lambda i: i.get("Restarts") == "1" and i.get("JobState") == "RUNNING", "second run")
    # the first run drains on Slurm's SIGTERM (its in-flight batches are committed): wait for the second to resume
    wait_for(lambda i: "resuming:" in log_path.read_text(), "the second run resuming")
    resumed_at = journal_batches(journal)
    wait_for(lambda i: journal_batches(journal) >= resumed_at + 2, "more committed batches after the requeue")
    second = journal_batches(journal)
    assert second < 13, "the job finished before the second requeue: raise echo_delay_s"
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True, timeout=30)
    info = wait_job(slurm, job, on_pending=lambda i: start_now(slurm, i))
    log = log_path.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), \
        f"{info}\n{log[-3000:]}\n{daemon_logs(slurm)}"
    check_output(tmp_path / "out", records)
    # three runs in one log (--open-mode=append), the last two resumed from what was committed
    for restart in range(3):
        assert f"slurm.sbatch: job {job} (restart {restart})" in log
    assert "USR1 at" in log and "requeueing job" in log
    assert "WARNING SIGTERM: draining: no new batches" in log  # the ranks drained on the requeue's SIGTERM
    after_usr1 = log[log.index("USR1 at"):]  # on USR1 the script drains the ranks, then requeues
    assert re.search(r"rank \d drained: \d+ batches in flight finished", after_usr1), after_usr1[:3000]
    assert after_usr1.index("stopped by SIGTERM") < after_usr1.index("requeueing job")
    resumed = [int(n) for n in re.findall(r"resuming: (\d+) of 200 records committed already", log)]
    assert len(resumed) == 2 and 0 < resumed[0] < resumed[1] < 200, resumed
    assert resumed[0] >= first * 16 and resumed[1] >= second * 16
    assert log.count("] INFO wrote ") == 1
    # every batch is in the journal exactly once: nothing was generated twice and committed twice
    spans = []
    for line in journal.read_text().splitlines():
        for b in json.loads(line).get("batches", []):
            spans.append(tuple(b[:2]) if isinstance(b, list) else (b.get("start"), b.get("stop")))
    assert len(spans) == len(set(spans))
