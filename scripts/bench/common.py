"""What every benchmark shares: the suites (the workloads' sizes and engine arguments), the workload files, a
job's process (started, bounded, killed with its whole tree), the code of another commit to compare against, and
the environment a result records. Commands come from spmd_dp.testing, as the tests' do."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from spmd_dp.testing import REPO

PY = sys.executable
JOB_TIMEOUT_S = float(os.environ.get("BENCH_JOB_TIMEOUT_S", "900"))

SUITES: Dict[str, Dict[str, Any]] = {
    # vLLM CPU on this 2-core machine: one core per rank, a model big enough that generation dominates
    # (max_num_seqs 32: the dataset is 12 engine-fulls at N=1, as a real job is many)
    "cpu": dict(model="spmd-dp/small-llama", device="cpu", prompts=384, prompt_len=64, max_tokens=128,
                ns=[1, 2], max_model_len=1024, skew_median=48, skew_cap=512, vllm_kwargs={"max_num_seqs": 32},
                vocab=1000),
    # Llama-3.1-8B-shaped dummy weights, 256 in / 256 out
    "gpu": dict(model=os.environ.get("BENCH_MODEL", "/tmp/dummy-llama8b"), device="cuda", prompts=4096,
                prompt_len=256, max_tokens=256, ns=[1, 2, 4], max_model_len=2048, skew_median=128,
                skew_cap=1536, vllm_kwargs={"load_format": "dummy"}, vocab=120000),
}


def make_workload(path: Path, n: int, prompt_len: int, max_tokens: int, kind: str, suite: Dict[str, Any],
                  seed: int = 0) -> Path:
    """uniform: fixed prompt length and max_tokens. skewed: log-normal max_tokens per record, shuffled.
    sorted: the same, longest first (the long records sit together: the worst case of a static split)."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        rec: Dict[str, Any] = {"id": i, "prompt": [rng.randrange(10, suite["vocab"]) for _ in range(prompt_len)]}
        if kind != "uniform":
            mt = int(min(suite["skew_cap"], max(4, rng.lognormvariate(math.log(suite["skew_median"]), 1.0))))
            rec["generation_options"] = {"max_tokens": mt}
        recs.append(rec)
    if kind == "sorted":
        recs.sort(key=lambda r: -r["generation_options"]["max_tokens"])
        for i, r in enumerate(recs):
            r["id"] = i
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return path


def engine_kwargs(suite: Dict[str, Any]) -> Dict[str, Any]:
    """Raw vLLM's LLM(...) arguments: those spmd_dp passes on the suite's device."""
    kw = {"model": suite["model"], "max_model_len": suite["max_model_len"], "disable_log_stats": True,
          **suite["vllm_kwargs"]}
    if suite["device"] == "cpu":  # as spmd_dp does on CPU
        kw.update(enforce_eager=True, dtype="float32")
    return kw


def vllm_overrides(suite: Dict[str, Any]) -> List[str]:
    """The suite's extra engine arguments as spmd_dp overrides."""
    return [f"+engine_options.vllm_kwargs.{k}={v}" for k, v in suite["vllm_kwargs"].items()]


def tree_env(tree: Path) -> Dict[str, str]:
    """PYTHONPATH for a job that runs the code of `tree` (prepended: a bundle's site-packages stay reachable)."""
    return {"PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}


def pinned(cmd: List[str], cpus: Optional[str]) -> List[str]:
    """The command on these cores only (taskset -c), or as it is."""
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def wait_or_kill(proc: subprocess.Popen, deadline: float) -> int:
    """Wait for a job's process (started in a session of its own); past the deadline kill its whole process
    group (engines included)."""
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return -9


def kill_tree(proc: subprocess.Popen) -> None:
    """The job and every process under it (torchrun starts its workers in sessions of their own)."""
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def baseline_tree(out: Path, rev: str) -> Path:
    """The code of `rev` (today's, before a change), unpacked beside the results: its spmd_dp runs from there."""
    tree = out / f"baseline-{rev}"
    if not (tree / "spmd_dp").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def summary(runs: List[Dict[str, Any]], key: str) -> Optional[Dict[str, float]]:
    """Minimum, median and count of one figure over repeated runs (None: no run has it)."""
    vals = sorted(r[key] for r in runs if key in r)
    return {"min": vals[0], "median": vals[len(vals) // 2], "n": len(vals)} if vals else None


def environment(suite: Dict[str, Any]) -> Dict[str, Any]:
    """The versions and hardware a result was measured on."""
    info: Dict[str, Any] = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count()}
    for mod in ("torch", "vllm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # not installed here
            info[mod] = f"unavailable ({type(e).__name__})"
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if suite["device"] == "cuda":
        info["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                       "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return info
