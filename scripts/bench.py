#!/usr/bin/env python3
"""spmd_dp benchmark suite: the same workload, in the same run, through
  (a) raw vLLM: one process, one LLM(...).generate over all prompts (the per-device ceiling);
  (b) the vLLM data-parallel example's method: N independent processes, balanced static
      contiguous split (start(r) = r*floor + min(r, rem)), no coordination;
  (c) spmd_dp schedule=static;   (d) spmd_dp schedule=dynamic.

  python scripts/bench.py --suite cpu|gpu --out DIR [--phases p1,p2] [--prompts N]
  python scripts/bench.py report --out DIR RESULTS_DIR...   (merge phase results into one report)
  python scripts/bench.py scan --out DIR [--records 1000000,10000000] [--ranks 1,2,4] [--vllm]
      (the input scan shared by the ranks against today's single-rank scan: scan throughput and
       launch-to-first-request, one file and 16 shards)
  python scripts/bench.py tail --out DIR [--repeat 3] [--vllm]
      (the tail: claims that shrink as the work runs out against today's fixed claim target; echo
       engine at N=4 with one late engine and a sorted skewed workload, vLLM CPU at N=2)

Each phase runs jobs side by side on disjoint devices (GPUs, or CPU cores) and writes
DIR/phase-<name>.json; the report step writes DIR/results.json (every figure, with the
workload, versions and hardware), DIR/results.md and PNG plots. Figures are ratios from
one run: throughput = output tokens / generation span (first rank's first request to
the last rank's last output), start-up = launch to first generation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

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


# ---------------------------------------------------------------------------------------------
# workloads
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


def balanced_split(n: int, world: int):
    floor, rem = divmod(n, world)
    return [(r * floor + min(r, rem), r * floor + min(r, rem) + floor + (1 if r < rem else 0)) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# (a)/(b): one raw vLLM process over a contiguous share of the workload
def raw_main(args: argparse.Namespace) -> None:
    launch = time.time()
    from vllm import LLM, SamplingParams

    from spmd_dp.models.embedded import resolve_model

    kwargs = json.loads(args.engine_kwargs)
    kwargs["model"] = resolve_model(kwargs["model"])
    with open(args.workload) as f:
        recs = [json.loads(line) for line in f][args.start:args.stop]
    llm = LLM(**kwargs)
    ready = time.time()
    prompts = [{"prompt_token_ids": r["prompt"]} for r in recs]
    params = [SamplingParams(temperature=0, ignore_eos=True,
                             max_tokens=r.get("generation_options", {}).get("max_tokens", args.max_tokens))
              for r in recs]
    outs = llm.generate(prompts, params, use_tqdm=False) if recs else []
    done = time.time()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    Path(args.result).write_text(json.dumps({
        "launch_unix": launch, "gen_start_unix": ready, "gen_end_unix": done, "output_tokens": tokens,
        "records": len(recs), "engine_start_s": ready - launch}))


def engine_kwargs(suite: Dict[str, Any]) -> Dict[str, Any]:
    kw = {"model": suite["model"], "max_model_len": suite["max_model_len"], "disable_log_stats": True,
          **suite["vllm_kwargs"]}
    if suite["device"] == "cpu":  # as spmd_dp does on CPU
        kw.update(enforce_eager=True, dtype="float32")
    return kw


# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    label: str
    method: str  # raw | dp_example | spmd
    n: int  # ranks (processes)
    slots: List[int]  # GPUs or CPU cores it runs on
    workload: str
    schedule: str = "dynamic"
    batch_size: int = 32
    g: int = 1  # GPUs per rank (spmd only)
    engine: str = "vllm_dp"
    extra: List[str] = field(default_factory=list)
    pin: bool = False  # CPU: the whole job (engine, its frontend, spmd_dp) on its slots (taskset)


def _device_env(suite, slots: List[int]) -> Dict[str, str]:
    # INFO: the logs then show each engine's distributed_init_method port (the per-rank port ranges at work)
    env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))
    if suite["device"] == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots))
    return env


def launch(job: Job, suite: Dict[str, Any], run_dir: Path, wl: Dict[str, Path]) -> Dict[str, Any]:
    """Start a job, wait for it, return its figures."""
    d = run_dir / job.label
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    procs = []
    log = open(d / "log.txt", "w")
    if job.method in ("raw", "dp_example"):
        n_records = sum(1 for _ in open(wl[job.workload]))
        for r, (start, stop) in enumerate(balanced_split(n_records, job.n)):
            env = _device_env(suite, [job.slots[r]])
            if suite["device"] == "cpu":
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(job.slots[r])
                env["VLLM_CPU_KVCACHE_SPACE"] = env.get("VLLM_CPU_KVCACHE_SPACE", "1")
            cmd = [PY, __file__, "raw", "--workload", str(wl[job.workload]), "--start", str(start), "--stop",
                   str(stop), "--max-tokens", str(suite["max_tokens"]), "--result", str(d / f"raw{r}.json"),
                   "--engine-kwargs", json.dumps(engine_kwargs(suite))]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    else:
        env = _device_env(suite, job.slots)
        overrides = [f"model_name={suite['model']}", f"data_dir={wl[job.workload].parent}",
                     f"input_data_path={wl[job.workload].name}", f"output_dir={d}", "name=out",
                     f"schedule={job.schedule}", f"batch_size={job.batch_size}", f"inference_engine={job.engine}",
                     "generation_options.temperature=0", "generation_options.ignore_eos=true",
                     "generation_options.seed=null", f"generation_options.max_tokens={suite['max_tokens']}",
                     f"engine_options.max_model_len={suite['max_model_len']}",
                     f"engine_options.gpus_per_dp_rank={job.g}", "log_level=INFO", "overwrite=true", *job.extra]
        overrides += [f"+engine_options.vllm_kwargs.{k}={v}" for k, v in suite["vllm_kwargs"].items()]
        if suite["device"] == "cpu":
            overrides += ["engine_options.device=cpu", "engine_options.cpu_cores_per_dp_rank=1"]
        port = 29600 + 10 * (job.slots[0] if job.slots else 0)
        cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={job.n}", f"--master-port={port}",
               "-m", "spmd_dp", *overrides]
        if job.pin:
            cmd = ["taskset", "-c", ",".join(map(str, job.slots)), *cmd]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    sampler = GpuSampler(procs) if suite["device"] == "cuda" else None
    codes = [_wait(p, t0 + JOB_TIMEOUT_S) for p in procs]
    if sampler:
        sampler.stop()
    log.close()
    res: Dict[str, Any] = {"label": job.label, "method": job.method, "n": job.n, "g": job.g, "slots": job.slots,
                           "workload": job.workload, "schedule": job.schedule, "batch_size": job.batch_size,
                           "exit_codes": codes, "wall_s": round(time.time() - t0, 3)}
    if any(codes):
        res["error"] = (d / "log.txt").read_text()[-3000:]
        print(f"  {job.label}: FAILED {codes}\n{res['error'][-1500:]}", flush=True)
        return res
    if job.method == "spmd":
        m = json.loads((d / "out.metrics.json").read_text())
        ranks = m["ranks"]
        starts = [r["gen_start_unix"] for r in ranks if r["gen_end_unix"]]
        ends = [r["gen_end_unix"] for r in ranks if r["gen_end_unix"]]
        res.update(output_tokens=m["total"]["output_tokens"], records=m["total"]["records"],
                   busy_s=[r["busy_s"] for r in ranks], engine_start_s=[r["engine_start_s"] for r in ranks],
                   rank0_peak_rss_mb=m["total"]["rank0_peak_rss_mb"], merge_mb_per_s=m["total"].get("merge_mb_per_s"))
        with open(d / "out.jsonl") as f:
            ids = [json.loads(line)["id"] for line in f]
        res["output_complete_and_ordered"] = ids == list(range(sum(1 for _ in open(wl[job.workload]))))
        res["rank_output_tokens"] = [r["output_tokens"] for r in ranks]
        (d / "out.jsonl").unlink()
        text = (d / "log.txt").read_text()
        res["physical_gpus"] = _physical_gpus_from_log(text)
        res["vllm_port_ranges"] = re.findall(r"\[rank (\d+)/\d+ .*vLLM ports (\d+)-(\d+)", text)
        res["engine_init_ports"] = sorted(int(p) for p in re.findall(r"distributed_init_method=tcp://[^:]+:(\d+)", text))
    else:
        parts = [json.loads((d / f"raw{r}.json").read_text()) for r in range(job.n)]
        starts = [p["gen_start_unix"] for p in parts if p["records"]]
        ends = [p["gen_end_unix"] for p in parts if p["records"]]
        res.update(output_tokens=sum(p["output_tokens"] for p in parts), records=sum(p["records"] for p in parts),
                   busy_s=[round(p["gen_end_unix"] - p["gen_start_unix"], 3) for p in parts],
                   engine_start_s=[round(p["engine_start_s"], 3) for p in parts])
    res["gen_s"] = round(max(ends) - min(starts), 3)
    res["startup_s"] = round(min(starts) - t0, 3)
    res["tokens_per_s"] = round(res["output_tokens"] / res["gen_s"], 1)
    busy = [b for b in res["busy_s"] if b > 0]
    res["imbalance"] = round(max(busy) / (sum(busy) / len(busy)), 4) if busy else None
    if sampler:
        res["engine_pids_by_gpu"] = sampler.result()
    print(f"  {job.label}: {res['tokens_per_s']:.1f} tok/s, gen {res['gen_s']:.1f}s, start {res['startup_s']:.1f}s,"
          f" busy {res['busy_s']}", flush=True)
    return res


JOB_TIMEOUT_S = float(os.environ.get("BENCH_JOB_TIMEOUT_S", "900"))


def _wait(proc: subprocess.Popen, deadline: float) -> int:
    """Wait for a job's process; past the deadline kill its whole process group (engines included)."""
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return -9


def _physical_gpus_from_log(text: str) -> Dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "physical GPUs (index:name:uuid:bus):" in line:
            rank = line.split("] INFO rank ")[1].split()[0]
            out[rank] = line.split("physical GPUs (index:name:uuid:bus): ")[1]
    return out


class GpuSampler:
    """Which GPU each engine process of a job runs on (nvidia-smi), mapped to the torchrun RANK above it."""

    def __init__(self, procs) -> None:
        self.roots = {p.pid for p in procs}
        self.seen: Dict[str, List[str]] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(3.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            for line in out.splitlines():
                pid, uuid = [x.strip() for x in line.split(",")[:2]]
                rank = self._rank_of(int(pid))
                if rank is not None:
                    self.seen.setdefault(rank, [])
                    if uuid not in self.seen[rank]:
                        self.seen[rank].append(uuid)

    def _rank_of(self, pid: int) -> Optional[str]:
        """Walk up the process tree: the torchrun worker above (RANK in its environment) or the raw process,
        if the chain reaches this job's own processes (jobs side by side are told apart)."""
        rank = None
        while pid > 1:
            try:
                if pid in self.roots:
                    return rank if rank is not None else f"proc{pid}"
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                ranks = [e[5:].decode() for e in env if e.startswith(b"RANK=")]
                if ranks and rank is None:
                    rank = ranks[0]
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return None
        return None

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)

    def result(self) -> Dict[str, List[str]]:
        return self.seen


# ---------------------------------------------------------------------------------------------
def phases(suite: Dict[str, Any], n_slots: int) -> Dict[str, List[Job]]:
    """The suite's phases, in order. Jobs side by side in one phase use disjoint slots (GPUs or cores)."""
    bs_all = suite["prompts"]
    if suite["device"] == "cpu":  # 2 cores: one job at a time, N = 1 and 2
        p = {"a1": [Job("a_raw_n1", "raw", 1, [0], "uniform")],
             "d1": [Job("d_dynamic_n1", "spmd", 1, [0], "uniform")],
             "d1_bsall": [Job("d_dynamic_n1_bsall", "spmd", 1, [0], "uniform", batch_size=bs_all)],
             # one rank on one core, all of it (not only its engine's threads): the base of the 2-core speedup
             "d1_pinned": [Job("d_dynamic_n1_pinned", "spmd", 1, [0], "uniform", pin=True)],
             "d2": [Job("d_dynamic_n2", "spmd", 2, [0, 1], "uniform")],
             "c2": [Job("c_static_n2", "spmd", 2, [0, 1], "uniform", schedule="static")],
             "b2": [Job("b_dp_example_n2", "dp_example", 2, [0, 1], "uniform")]}
        for kind in ("sorted", "skewed"):
            p[f"b2_{kind}"] = [Job(f"b_dp_example_n2_{kind}", "dp_example", 2, [0, 1], kind)]
            p[f"d2_{kind}"] = [Job(f"d_dynamic_n2_{kind}", "spmd", 2, [0, 1], kind)]
        return p
    if n_slots < 4:
        raise SystemExit(f"the gpu suite needs 4 GPUs, found {n_slots}")
    return {  # 4 GPUs; about 13 minutes with a warm compile cache after the first phase
        "p1": [Job("a_raw_n1", "raw", 1, [0], "uniform"), Job("d_dynamic_n1", "spmd", 1, [1], "uniform"),
               Job("d_dynamic_n1_bsall", "spmd", 1, [2], "uniform", batch_size=bs_all)],
        "p2": [Job("d_dynamic_n2", "spmd", 2, [0, 1], "uniform"),
               Job("b_dp_example_n2", "dp_example", 2, [2, 3], "uniform")],
        "p3": [Job("c_static_n2", "spmd", 2, [0, 1], "uniform", schedule="static"),
               Job("d_dynamic_1x2_tp2", "spmd", 1, [2, 3], "uniform", g=2)],
        "p4": [Job("d_dynamic_n4", "spmd", 4, [0, 1, 2, 3], "uniform")],
        "p5": [Job("c_static_n4", "spmd", 4, [0, 1, 2, 3], "uniform", schedule="static")],
        "p6": [Job("b_dp_example_n4", "dp_example", 4, [0, 1, 2, 3], "uniform")],
        "p7": [Job("b_dp_example_n2_sorted", "dp_example", 2, [0, 1], "sorted"),
               Job("d_dynamic_n2_sorted", "spmd", 2, [2, 3], "sorted")],
        "p8": [Job("d_dynamic_2x2", "spmd", 2, [0, 1, 2, 3], "uniform", g=2)],
        "p9": [Job("b_dp_example_n2_skewed", "dp_example", 2, [0, 1], "skewed"),
               Job("d_dynamic_n2_skewed", "spmd", 2, [2, 3], "skewed")],
        # a short session: start-up against raw vLLM, and tensor parallelism inside ranks (1x2, 2x2)
        "s1": [Job("a_raw_n1", "raw", 1, [0], "uniform"), Job("d_dynamic_n1", "spmd", 1, [1], "uniform"),
               Job("d_dynamic_1x2_tp2", "spmd", 1, [2, 3], "uniform", g=2)],
        "s2": [Job("d_dynamic_2x2", "spmd", 2, [0, 1, 2, 3], "uniform", g=2)],
    }


def echo_memory(out: Path, records: int) -> Dict[str, Any]:
    """Rank 0's peak RSS and merge speed through the echo engine: ~1 KB of output per record."""
    d = out / f"echo_{records}"
    wl = d / "in.jsonl"
    d.mkdir(parents=True, exist_ok=True)
    words = " ".join(f"w{j:04d}" for j in range(170))  # ~1 KB
    with open(wl, "w") as f:
        for i in range(records):
            f.write(json.dumps({"id": i, "prompt": words}) + "\n")
    t0 = time.time()
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29690", "-m", "spmd_dp",
           "inference_engine=echo", f"data_dir={d}", "input_data_path=in.jsonl", f"output_dir={d}", "name=out",
           "generation_options.max_tokens=170", "batch_size=256", "log_level=WARNING"]
    code = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(d / "log.txt", "w")).returncode
    m = json.loads((d / "out.metrics.json").read_text())["total"] if code == 0 else {}
    res = {"records": records, "exit_code": code, "wall_s": round(time.time() - t0, 1),
           "rank0_peak_rss_mb": m.get("rank0_peak_rss_mb"), "merge_mb_per_s": m.get("merge_mb_per_s"),
           "output_bytes": m.get("output_bytes")}
    for p in (wl, d / "out.jsonl"):
        p.unlink(missing_ok=True)
    print(f"  echo {records} records: {res}", flush=True)
    return res


def run_suite(args: argparse.Namespace) -> None:
    suite = dict(SUITES[args.suite])
    if args.prompts:
        suite["prompts"] = args.prompts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wl = {kind: make_workload(out / "workloads" / f"{kind}.jsonl", suite["prompts"], suite["prompt_len"],
                              suite["max_tokens"], kind, suite) for kind in ("uniform", "skewed", "sorted")}
    if suite["device"] == "cuda":
        import torch

        n_slots = torch.cuda.device_count()
    else:
        n_slots = len(os.sched_getaffinity(0))
    all_phases = phases(suite, n_slots)
    wanted = args.phases.split(",") if args.phases else list(all_phases) + ["echo"]
    env_info = environment(suite)
    for name in wanted:
        if name == "echo":
            res = {"echo": [echo_memory(out, n) for n in (args.echo_records // 10, args.echo_records)]}
        else:
            jobs = all_phases[name]
            print(f"phase {name}: {[j.label for j in jobs]}", flush=True)
            results: List[Dict[str, Any]] = [None] * len(jobs)  # type: ignore[list-item]

            def go(i: int, job: Job) -> None:
                results[i] = launch(job, suite, out / "runs", wl)

            threads = [threading.Thread(target=go, args=(i, j)) for i, j in enumerate(jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            res = {"jobs": results}
        res.update(phase=name, suite=args.suite, workload=workload_info(suite), environment=env_info)
        (out / f"phase-{name}.json").write_text(json.dumps(res, indent=1))
    report(out, [out])


def workload_info(suite: Dict[str, Any]) -> Dict[str, Any]:
    return {k: suite[k] for k in ("model", "prompts", "prompt_len", "max_tokens", "skew_median", "skew_cap")} | {
        "sampling": "greedy, ignore_eos", "skewed": "max_tokens ~ lognormal(median, sigma=1), capped; sorted = "
                                                    "longest first"}


def environment(suite: Dict[str, Any]) -> Dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
def report(out: Path, inputs: List[Path]) -> Dict[str, Any]:
    jobs: Dict[str, Dict[str, Any]] = {}
    echo: List[Dict[str, Any]] = []
    meta: Dict[str, Any] = {}
    for d in inputs:
        for f in sorted(Path(d).glob("phase-*.json")):
            ph = json.loads(f.read_text())
            meta = {k: ph[k] for k in ("suite", "workload", "environment")}
            echo += ph.get("echo", [])
            for j in ph.get("jobs", []):
                if j and "error" not in j:
                    jobs[j["label"]] = j
    get = lambda label, key: jobs.get(label, {}).get(key)  # noqa: E731
    a = get("a_raw_n1", "tokens_per_s")
    res: Dict[str, Any] = {**meta, "jobs": jobs, "echo": echo}
    res["scaling_efficiency"] = {}
    for label, j in jobs.items():
        if label.startswith("d_dynamic_n") and j["workload"] == "uniform" and not label.endswith(("_bsall", "_pinned")) and a:
            res["scaling_efficiency"][str(j["n"])] = round(j["tokens_per_s"] / (j["n"] * a), 4)
    res["scaling_efficiency_static"] = {str(j["n"]): round(j["tokens_per_s"] / (j["n"] * a), 4) for label, j in
                                        jobs.items() if label.startswith("c_static_n") and j["workload"] == "uniform" and a}
    res["scaling_efficiency_dp_example"] = {str(j["n"]): round(j["tokens_per_s"] / (j["n"] * a), 4) for label, j in
                                            jobs.items() if label.startswith("b_dp_example_n") and j["workload"] == "uniform" and a}
    d1, d1all = get("d_dynamic_n1", "gen_s"), get("d_dynamic_n1_bsall", "gen_s")
    res["overhead_n1"] = round(d1 / get("a_raw_n1", "gen_s") - 1, 4) if d1 and a else None
    res["startup_extra_s"] = (round(get("d_dynamic_n1", "startup_s") - get("a_raw_n1", "startup_s"), 2)
                              if d1 and a else None)
    res["batch32_vs_all"] = round(get("d_dynamic_n1", "tokens_per_s") / get("d_dynamic_n1_bsall", "tokens_per_s"), 4) \
        if d1 and d1all else None
    res.update(skew_speedup_dynamic_vs_static={}, skew_vs_ideal={}, skew_speedup_dynamic_vs_spmd_static={})
    for kind in ("sorted", "skewed"):
        b = next((j for lbl, j in jobs.items() if lbl.startswith("b_dp_example") and lbl.endswith(kind)), None)
        c = next((j for lbl, j in jobs.items() if lbl.startswith("c_static") and lbl.endswith(kind)), None)
        d = next((j for lbl, j in jobs.items() if lbl.startswith("d_dynamic") and lbl.endswith(kind)), None)
        if b and d:
            res["skew_speedup_dynamic_vs_static"][kind] = round(b["gen_s"] / d["gen_s"], 3)
            res["skew_vs_ideal"][kind] = round(d["gen_s"] / (sum(d["busy_s"]) / d["n"]), 4)
        if c and d:
            res["skew_speedup_dynamic_vs_spmd_static"][kind] = round(c["gen_s"] / d["gen_s"], 3)
    d2, pinned = get("d_dynamic_n2", "tokens_per_s"), get("d_dynamic_n1_pinned", "tokens_per_s")
    res["cpu_2ranks_vs_1rank_1core"] = round(d2 / pinned, 3) if d2 and pinned else None
    res["rank0_peak_rss_mb"] = {str(e["records"]): e["rank0_peak_rss_mb"] for e in echo}
    res["merge_mb_per_s"] = {str(e["records"]): e["merge_mb_per_s"] for e in echo}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    plots(res, out)
    print((out / "results.md").read_text())
    return res


def markdown(res: Dict[str, Any]) -> str:
    rows = ["| run | method | ranks x GPUs | workload | records | output tok/s | generation s | start-up s | "
            "per-rank busy s | imbalance |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in sorted(res["jobs"]):
        j = res["jobs"][label]
        rows.append(f"| {label} | {j['method']}{' ' + j['schedule'] if j['method'] == 'spmd' else ''} | "
                    f"{j['n']}x{j['g']} | {j['workload']} | {j['records']} | {j['tokens_per_s']:.0f} | {j['gen_s']:.1f} | "
                    f"{j['startup_s']:.1f} | {', '.join(f'{b:.1f}' for b in j['busy_s'])} | {j['imbalance']} |")
    keys = ["scaling_efficiency", "scaling_efficiency_static", "scaling_efficiency_dp_example", "overhead_n1",
            "startup_extra_s", "batch32_vs_all", "skew_speedup_dynamic_vs_static", "skew_speedup_dynamic_vs_spmd_static",
            "skew_vs_ideal", "cpu_2ranks_vs_1rank_1core", "rank0_peak_rss_mb", "merge_mb_per_s"]
    summary = "\n".join(f"- `{k}`: {json.dumps(res.get(k))}" for k in keys)
    return "\n".join(rows) + "\n\n" + summary + "\n"


def plots(res: Dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    jobs = res["jobs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    a = jobs.get("a_raw_n1", {}).get("tokens_per_s")
    for prefix, name in (("b_dp_example_n", "(b) DP example"), ("c_static_n", "(c) spmd_dp static"),
                         ("d_dynamic_n", "(d) spmd_dp dynamic")):
        pts = sorted((j["n"], j["tokens_per_s"]) for lbl, j in jobs.items()
                     if lbl.startswith(prefix) and j["workload"] == "uniform" and "bs" not in lbl)
        if prefix.startswith("d") and a:
            pts = sorted(set(pts) | {(1, jobs["d_dynamic_n1"]["tokens_per_s"])} if "d_dynamic_n1" in jobs else pts)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if a:
        ns = sorted({j["n"] for j in jobs.values()})
        ax.plot(ns, [a * n for n in ns], "k--", label="N x (a) raw vLLM")
    ax.set_xlabel("ranks (N)")
    ax.set_ylabel("output tokens/s")
    ax.legend()
    ax.set_title("Throughput vs N (uniform workload)")
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_n.png", dpi=120)
    plt.close(fig)
    skew = [(lbl, j) for lbl, j in sorted(jobs.items()) if j["workload"] != "uniform"]
    if skew:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (lbl, j) in enumerate(skew):
            for r, b in enumerate(j["busy_s"]):
                ax.bar(i + r * 0.8 / len(j["busy_s"]), b, width=0.8 / len(j["busy_s"]), color=f"C{r}")
        ax.set_xticks(range(len(skew)))
        ax.set_xticklabels([lbl.replace("_", "\n", 2) for lbl, _ in skew], fontsize=7)
        ax.set_ylabel("per-rank busy time (s)")
        ax.set_title("Skewed workloads: per-rank busy time, static vs dynamic")
        fig.tight_layout()
        fig.savefig(out / "busy_per_rank.png", dpi=120)
        plt.close(fig)



# ---------------------------------------------------------------------------------------------
# the input scan (issue 14): scan throughput and launch-to-first-request, the shared scan against
# today's (rank 0 alone, then the engines), one file and 16 shards, 1/2/4 ranks
SCAN_BASE_REV = "0c59505"  # the last commit where rank 0 scanned alone (spmd_dp/inputs.py)


def scan_workload(d: Path, n: int, record_bytes: int, shards: int) -> Dict[str, Any]:
    """n records of ~record_bytes as one JSONL file, and the same records as `shards` files."""
    one, folder = d / f"one-{n}.jsonl", d / f"shards-{n}"
    d.mkdir(parents=True, exist_ok=True)
    if not one.exists():
        pad = "x" * max(record_bytes - 60, 1)
        tmp = one.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for start in range(0, n, 100_000):
                f.write("".join(f'{{"id": "r{i:010d}", "prompt": "w{i} {pad}"}}\n'
                                for i in range(start, min(start + 100_000, n))))
        tmp.rename(one)
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        per = -(-n // shards)
        with open(one) as src:
            for k in range(shards):
                with open(tmp / f"part-{k:03d}.jsonl", "w") as f:
                    for _ in range(per):
                        line = src.readline()
                        if not line:
                            break
                        f.write(line)
        tmp.rename(folder)
    return {"one": one, "shards": folder, "bytes": one.stat().st_size, "records": n}


def baseline_tree(out: Path, rev: str) -> Path:
    """The code of `rev` (today's scan), unpacked beside the results: its spmd_dp runs from there."""
    tree = out / f"baseline-{rev}"
    if not (tree / "spmd_dp").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


SCAN_IN_PROCESS = r"""
import json, resource, sys, time
from pathlib import Path
from spmd_dp.config import load_config
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.inputs import RecordSpec, scan_input
path, offset_every = sys.argv[1], int(sys.argv[2])
spec = RecordSpec("id", PromptBuilder(load_config([])).check)
def status(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key)))
rss0 = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from here
t0, c0 = time.perf_counter(), time.process_time()
index, bad = scan_input(Path(path), spec, offset_every)
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "records": index.n_records,
                  "scan_rss_mb": (status("VmHWM:") - rss0) / 1024}))
"""


def _pinned(cmd: List[str], cpus: Optional[str]) -> List[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def scan_in_process(tree: Path, path: Path, stride: int, cpus: Optional[str]) -> Dict[str, Any]:
    """One process scans the input (no torchrun), with the code of `tree`: wall and CPU seconds, RSS growth."""
    p = subprocess.run(_pinned([PY, "-c", SCAN_IN_PROCESS, str(path), str(stride)], cpus), cwd=tree,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree)))
    if p.returncode:
        return {"error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _kill_tree(proc: subprocess.Popen) -> None:
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


def scan_job(tree: Path, out: Path, label: str, data_dir: Path, input_path: str, nproc: int, extra: List[str],
             cpus: Optional[str], timeout: float = 1800) -> Dict[str, Any]:
    """torchrun -m spmd_dp (the code of `tree`) until its first request: launch-to-first-request and, from
    the log, each rank's scan time. The job is stopped at its first request (the generation is not measured)."""
    d = out / "runs" / label
    d.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", "-m", "spmd_dp", f"data_dir={data_dir}", f"input_data_path={input_path}",
           f"output_dir={d}", "name=out", "overwrite=true", "batch_size=256", "generation_options.max_tokens=1",
           *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.Popen(_pinned(cmd, cpus), cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killer = threading.Timer(timeout, lambda: _kill_tree(proc))
    killer.start()
    first = None
    scans: Dict[str, float] = {}
    cpu: Dict[str, float] = {}
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"\[rank (\d+)/\d+ .*input index: .*\(scan ([\d.]+) s(, this rank's cpu ([\d.]+) s)?", line)
        if m:
            scans[m.group(1)] = float(m.group(2))
            if m.group(4):
                cpu[m.group(1)] = float(m.group(4))
        if re.search(r"Assigned \d+ prompts to rank \d+ \(batch", line):
            first = time.time()
            break
    killer.cancel()
    _kill_tree(proc)
    (d / "log.txt").write_text("".join(lines))
    shutil.rmtree(d / "out.parts", ignore_errors=True)
    res: Dict[str, Any] = {"label": label, "ranks": nproc, "input": input_path}
    if first is None:
        res["error"] = "".join(lines)[-2000:]
        print(f"  {label}: FAILED\n{res['error'][-1500:]}", flush=True)
        return res
    res["launch_to_first_request_s"] = round(first - t0, 2)
    if scans:
        res["scan_s"] = round(max(scans.values()), 3)
        res["scan_s_per_rank"] = scans
    if cpu:  # each rank's scan thread: the cost the ranks divide
        res["scan_cpu_s"] = round(max(cpu.values()), 3)
        res["scan_cpu_s_total"] = round(sum(cpu.values()), 3)
    print(f"  {label}: first request {res['launch_to_first_request_s']} s, scan {res.get('scan_s')} s", flush=True)
    return res


RAW_START = ("import json, time, sys; t0 = float(sys.argv[1]); from vllm import LLM; from spmd_dp.models.embedded import "
             "resolve_model; kw = json.loads(sys.argv[2]); kw['model'] = resolve_model(kw['model']); LLM(**kw); "
             "print(json.dumps({'engine_ready_s': time.time() - t0}), flush=True)")


def raw_engine_start(args: argparse.Namespace, cpus: Optional[str]) -> Dict[str, Any]:
    """Raw vLLM: launch to an engine ready, with the engine arguments spmd_dp passes on this device."""
    suite = dict(SUITES[args.device_suite], model=args.model, vllm_kwargs=json.loads(args.vllm_kwargs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if suite["device"] == "cpu":
        env.update(VLLM_CPU_OMP_THREADS_BIND=(cpus or "0").split(",")[0], VLLM_CPU_KVCACHE_SPACE="1")
    p = subprocess.run(_pinned([PY, "-c", RAW_START, repr(time.time()), json.dumps(engine_kwargs(suite))], cpus),
                       cwd=REPO, env=env, capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-2000:]}


def _summary(runs: List[Dict[str, Any]], key: str) -> Optional[Dict[str, float]]:
    vals = sorted(r[key] for r in runs if key in r)
    return {"min": vals[0], "median": vals[len(vals) // 2], "n": len(vals)} if vals else None


def scan_suite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base_tree) if args.base_tree else baseline_tree(out, args.base_rev)
    ranks = [int(r) for r in args.ranks.split(",")]
    cpus = args.cpus
    results: Dict[str, Any] = {"environment": environment(SUITES["cpu"]), "base_rev": args.base_rev, "cpus": cpus,
                               "record_bytes": args.record_bytes, "shards": args.shards, "repeat": args.repeat,
                               "sizes": []}
    for n in [int(x) for x in args.records.split(",")]:
        wl = scan_workload(Path(args.workloads or out / "workloads"), n, args.record_bytes, args.shards)
        size: Dict[str, Any] = {"records": n, "bytes": wl["bytes"], "load_before": os.getloadavg()}
        print(f"scan: {n} records, {wl['bytes'] / 1e6:.0f} MB", flush=True)
        echo = ["inference_engine=echo"]
        arms = {"in:today": lambda: scan_in_process(base, wl["one"], 256, cpus),
                "in:new_one_file": lambda: scan_in_process(REPO, wl["one"], 256, cpus),
                "in:new_shards": lambda: scan_in_process(REPO, wl["shards"], 256, cpus)}
        for r in ranks:  # arms side by side in each repeat: today, then new, as close in time as can be
            arms[f"today_n{r}"] = (lambda r=r: scan_job(base, out, f"today_{n}_n{r}", wl["one"].parent,
                                                         wl["one"].name, r, echo, cpus))
            for layout, path in (("one", wl["one"].name), ("shards", wl["shards"].name)):
                arms[f"new_{layout}_n{r}"] = (lambda r=r, layout=layout, path=path: scan_job(
                    REPO, out, f"new_{layout}_{n}_n{r}", wl["one"].parent, path, r, echo, cpus))
        if args.echo_start_s:  # an engine that takes echo_start_s to start and no CPU (as a GPU's): the scan hides
            for r in ranks:
                arms[f"new_one_start{args.echo_start_s:g}_n{r}"] = (lambda r=r: scan_job(
                    REPO, out, f"new_one_start_{n}_n{r}", wl["one"].parent, wl["one"].name, r,
                    [*echo, f"engine_options.echo_start_s={args.echo_start_s}"], cpus))
        if args.vllm:  # the scan behind a real engine start
            eng = [f"model_name={args.model}", *args.vllm_overrides.split()]
            for r in [r for r in ranks if r <= args.vllm_max_ranks]:
                arms[f"vllm_today_n{r}"] = (lambda r=r: scan_job(base, out, f"vllm_today_{n}_n{r}", wl["one"].parent,
                                                                 wl["one"].name, r, eng, cpus))
                arms[f"vllm_new_n{r}"] = (lambda r=r: scan_job(REPO, out, f"vllm_new_{n}_n{r}", wl["one"].parent,
                                                               wl["one"].name, r, eng, cpus))
            arms["vllm_raw_start"] = lambda: raw_engine_start(args, cpus)
        if args.arms:
            arms = {name: arm for name, arm in arms.items() if re.search(args.arms, name)}
        runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in arms}
        for rep in range(args.repeat):
            for name, arm in arms.items():
                if name.startswith("vllm") and rep >= args.vllm_repeat:
                    continue
                runs[name].append(arm())
                if name.startswith("in:"):
                    print(f"  {name}: {runs[name][-1]}", flush=True)
        size["runs"] = runs
        size["summary"] = {name: {k: _summary(rs, k) for k in ("wall_s", "cpu_s", "scan_rss_mb", "scan_s", "scan_cpu_s",
                                                                "scan_cpu_s_total", "launch_to_first_request_s",
                                                                "engine_ready_s")
                                  if _summary(rs, k)} for name, rs in runs.items()}
        size["load_after"] = os.getloadavg()
        results["sizes"].append(size)
        (out / "scan.json").write_text(json.dumps(results, indent=1))
    (out / "scan.md").write_text(scan_markdown(results))
    print((out / "scan.md").read_text())


def scan_markdown(res: Dict[str, Any]) -> str:
    """Minimum over the repeats (median in brackets): the least disturbed run is the closest to the cost."""
    rows = ["| records | MB | arm | ranks | scan s | records/s | MB/s | vs today's scan | launch to first request s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for size in res["sizes"]:
        n, mb, summ = size["records"], size["bytes"] / 1e6, size["summary"]
        today = (summ.get("in:today", {}).get("wall_s") or {}).get("min")
        for name, sm in summ.items():
            scan = sm.get("wall_s") or sm.get("scan_s")
            first = sm.get("launch_to_first_request_s") or sm.get("engine_ready_s")
            ranks = re.search(r"_n(\d+)$", name)
            extra = ""
            if "cpu_s" in sm:
                extra = f" (one process; cpu {sm['cpu_s']['min']:.1f} s, +{sm['scan_rss_mb']['min']:.0f} MB RSS)"
            cells = [str(n), f"{mb:.0f}", name + extra, ranks.group(1) if ranks else "1"]
            if scan:
                cells += [f"{scan['min']:.2f} ({scan['median']:.2f})", f"{n / scan['min']:.0f}",
                          f"{mb / scan['min']:.1f}", f"{today / scan['min']:.2f}x" if today else ""]
            else:
                cells += ["", "", "", ""]
            cells.append(f"{first['min']:.1f} ({first['median']:.1f})" if first else "")
            rows.append("| " + " | ".join(cells) + " |")
        rows.append(f"| | | load average before / after: {[round(x, 1) for x in size['load_before']]} / "
                    f"{[round(x, 1) for x in size['load_after']]} | | | | | | |")
    return "\n".join(rows) + "\n"

# ---------------------------------------------------------------------------------------------
# the tail (issue 15): claims that shrink as the work runs out, and that hold back while engines start, against
# today's fixed claim target. Echo engine at N=4 (one engine's late start; a sorted skewed workload) and real
# vLLM CPU at N=2 (the cpu suite's sorted workload). Figure: span / ideal, the ideal being every rank ending
# together once its engine is up: (sum of busy + sum of the ranks' start offsets) / N (= total work / N when
# the engines start together).
TAIL_BASE_REV = "fc3cab1"  # main before issue 15: in flight = min(capacity + batch_size, fair share)


def tail_tree(out: Path, rev: str, late_rank: int) -> Path:
    """Today's code, with its echo engine given what the arms need (patched in: two lines): the start delay on one
    rank only, and a capacity of max_num_seqs (it was batch_size)."""
    tree = baseline_tree(out, rev)
    echo = tree / "spmd_dp" / "engines" / "echo.py"
    text = echo.read_text()
    text = text.replace("        time.sleep(options.echo_start_s)\n",
                        f"        time.sleep(options.echo_start_s if rank == {late_rank} else 0.0)\n")
    text = text.replace("        self.capacity = batch_size\n", "        self.capacity = options.max_num_seqs or batch_size\n")
    echo.write_text(text)
    return tree


def tail_workload(path: Path, kind: str, n: int, seed: int = 0) -> Path:
    """start: n records of 4 words. sorted / shuffled: max_tokens ~ log-normal(median 8, sigma 1), capped at 96
    (prompts of 96 words: the echo engine returns max_tokens of them), longest first or shuffled."""
    rng = random.Random(seed)
    recs: List[Dict[str, Any]] = []
    for i in range(n):
        if kind == "start":
            recs.append({"id": i, "prompt": "w x y z"})
        else:
            mt = int(min(96, max(1, rng.lognormvariate(math.log(8), 1.0))))
            recs.append({"id": i, "prompt": " ".join(["w"] * 96), "generation_options": {"max_tokens": mt}})
    if kind == "sorted":
        recs.sort(key=lambda r: -r["generation_options"]["max_tokens"])
        for i, r in enumerate(recs):
            r["id"] = i
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def tail_figures(metrics: Dict[str, Any]) -> Dict[str, Any]:
    ranks = metrics["ranks"]
    s0 = min(r["gen_start_unix"] for r in ranks)
    span = max(r["gen_end_unix"] for r in ranks) - s0
    ideal = (sum(r["busy_s"] for r in ranks) + sum(r["gen_start_unix"] - s0 for r in ranks)) / len(ranks)
    work = [r["output_tokens"] for r in ranks]
    return {"span_s": round(span, 3), "ideal_s": round(ideal, 3), "span_vs_ideal": round(span / ideal, 4),
            "records": [r["records"] for r in ranks], "busy_s": [r["busy_s"] for r in ranks],
            "start_s": [round(r["gen_start_unix"] - s0, 2) for r in ranks], "output_tokens": work,
            "tokens_per_s": round(sum(work) / span, 1), "work_max_vs_mean": round(max(work) / (sum(work) / len(work)), 4)}


def tail_job(tree: Path, out: Path, label: str, workload: Path, nproc: int, overrides: List[str]) -> Dict[str, Any]:
    d = out / "runs" / label
    d.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", "-m", "spmd_dp", f"data_dir={workload.parent}", f"input_data_path={workload.name}",
           f"output_dir={d}", "name=out", "overwrite=true", "log_level=INFO", *overrides]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1"),
                       capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    (d / "log.txt").write_text(p.stderr)
    res: Dict[str, Any] = {"label": label, "ranks": nproc, "wall_s": round(time.time() - t0, 2), "load": os.getloadavg()}
    if p.returncode:
        res["error"] = p.stderr[-2000:]
        print(f"  {label}: FAILED\n{res['error'][-1500:]}", flush=True)
        return res
    res.update(tail_figures(json.loads((d / "out.metrics.json").read_text())))
    shutil.rmtree(d / "out", ignore_errors=True)
    print(f"  {label}: span {res['span_s']} s, ideal {res['ideal_s']} s: {res['span_vs_ideal']}; records "
          f"{res['records']}, work max/mean {res['work_max_vs_mean']}", flush=True)
    return res


def tail_suite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    late = 3
    base = tail_tree(out, args.base_rev, late)
    wl = out / "workloads"
    echo = ["inference_engine=echo", "batch_size=8", "generation_options.max_tokens=96",
            f"engine_options.max_num_seqs={args.capacity}"]
    arms = {}
    start = [*echo, "engine_options.echo_delay_s=0.0025", f"engine_options.echo_start_s={args.start_s}"]
    path = tail_workload(wl / "start.jsonl", "start", 4 * args.capacity)  # one engine-full per rank
    arms["echo_start_today"] = (base, path, 4, start)
    arms["echo_start_new"] = (REPO, path, 4, [*start, f"engine_options.echo_start_ranks=[{late}]"])
    for kind in ("sorted", "shuffled"):
        path = tail_workload(wl / f"{kind}.jsonl", kind, args.records)
        for name, tree in (("today", base), ("new", REPO)):
            arms[f"echo_{kind}_{name}"] = (tree, path, 4, [*echo, "engine_options.echo_delay_s=0.0005"])
    if args.vllm:  # the cpu suite's sorted workload, 2 ranks on 2 cores
        suite = SUITES["cpu"]
        path = make_workload(wl / "vllm_sorted.jsonl", suite["prompts"], suite["prompt_len"], suite["max_tokens"],
                             "sorted", suite)
        eng = [f"model_name={suite['model']}", "engine_options.device=cpu", "engine_options.cpu_cores_per_dp_rank=1",
               f"engine_options.max_model_len={suite['max_model_len']}", "batch_size=32",
               "generation_options.temperature=0", "generation_options.ignore_eos=true", "generation_options.seed=null",
               f"generation_options.max_tokens={suite['max_tokens']}"]
        eng += [f"+engine_options.vllm_kwargs.{k}={v}" for k, v in suite["vllm_kwargs"].items()]
        for name, tree in (("today", base), ("new", REPO)):
            arms[f"vllm_sorted_{name}"] = (tree, path, 2, eng)
    if args.arms:
        arms = {k: v for k, v in arms.items() if re.search(args.arms, k)}
    results: Dict[str, Any] = {"environment": environment(SUITES["cpu"]), "base_rev": args.base_rev,
                               "load_before": os.getloadavg(), "runs": {k: [] for k in arms}}
    for rep in range(args.repeat):  # arms side by side in each repeat
        for name, (tree, path, nproc, overrides) in arms.items():
            if name.startswith("vllm") and rep >= args.vllm_repeat:
                continue
            results["runs"][name].append(tail_job(tree, out, f"{name}_{rep}", path, nproc, overrides))
        (out / "tail.json").write_text(json.dumps(results, indent=1))
    results["load_after"] = os.getloadavg()
    (out / "tail.json").write_text(json.dumps(results, indent=1))
    (out / "tail.md").write_text(tail_markdown(results))
    print((out / "tail.md").read_text())


def tail_markdown(res: Dict[str, Any]) -> str:
    rows = ["| arm | runs | span / ideal (each run) | span s | records per rank | work max / mean | tok/s |",
            "|---|---|---|---|---|---|---|"]
    for name, runs in res["runs"].items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append(f"| {name} | {len(runs)} | failed | | | | |")
            continue
        best = min(ok, key=lambda r: r["span_vs_ideal"])
        rows.append(f"| {name} | {len(ok)} | {', '.join(str(r['span_vs_ideal']) for r in ok)} | {best['span_s']} | "
                    f"{best['records']} | {best['work_max_vs_mean']} | {best['tokens_per_s']} |")
    rows.append(f"\nload average before / after: {[round(x, 1) for x in res['load_before']]} / "
                f"{[round(x, 1) for x in res.get('load_after', [])]}")
    return "\n".join(rows) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "raw":
        p = argparse.ArgumentParser()
        p.add_argument("raw")
        for a in ("--workload", "--result", "--engine-kwargs"):
            p.add_argument(a, required=True)
        for a in ("--start", "--stop", "--max-tokens"):
            p.add_argument(a, type=int, required=True)
        raw_main(p.parse_args())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "scan":
        p = argparse.ArgumentParser(description="the input scan: shared by the ranks vs today's (rank 0 alone)")
        p.add_argument("scan")
        p.add_argument("--out", required=True)
        p.add_argument("--records", default="1000000", help="comma-separated sizes, e.g. 1000000,10000000")
        p.add_argument("--record-bytes", type=int, default=200)
        p.add_argument("--shards", type=int, default=16)
        p.add_argument("--ranks", default="1,2,4")
        p.add_argument("--base-rev", default=SCAN_BASE_REV, help="the commit of today's scan")
        p.add_argument("--base-tree", help="today's code unpacked already (git archive BASE_REV)")
        p.add_argument("--workloads", help="where the workload files are (made if missing)")
        p.add_argument("--repeat", type=int, default=3, help="runs of each arm (the minimum is reported)")
        p.add_argument("--cpus", help="pin every job to these cores (taskset -c), e.g. 0,1")
        p.add_argument("--arms", help="a regular expression: run only the arms it finds")
        p.add_argument("--echo-start-s", type=float, default=0.0,
                       help="also the new scan behind an echo engine that takes this long to start")
        p.add_argument("--vllm", action="store_true", help="also launch-to-first-request with real vLLM")
        p.add_argument("--vllm-repeat", type=int, default=1)
        p.add_argument("--vllm-max-ranks", type=int, default=2)
        p.add_argument("--device-suite", default="cpu", choices=list(SUITES), help="engine arguments of this suite")
        p.add_argument("--model", default="spmd-dp/tiny-llama")
        p.add_argument("--vllm-kwargs", default="{}", help="JSON: more engine arguments (raw vLLM)")
        p.add_argument("--vllm-overrides", default="engine_options.device=cpu engine_options.cpu_cores_per_dp_rank=1 "
                       "engine_options.max_model_len=512", help="spmd_dp overrides of the vLLM arms")
        scan_suite(p.parse_args())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "tail":
        p = argparse.ArgumentParser(description="the tail: shrinking claims against today's fixed claim target")
        p.add_argument("tail")
        p.add_argument("--out", required=True)
        p.add_argument("--base-rev", default=TAIL_BASE_REV, help="the commit of today's claims")
        p.add_argument("--capacity", type=int, default=256, help="the echo engine's max_num_seqs")
        p.add_argument("--records", type=int, default=1024, help="records of the skewed workloads")
        p.add_argument("--start-s", type=float, default=1.5, help="how late rank 3's echo engine starts")
        p.add_argument("--repeat", type=int, default=3)
        p.add_argument("--arms", help="a regular expression: run only the arms it finds")
        p.add_argument("--vllm", action="store_true", help="also real vLLM CPU at N=2 (the sorted workload)")
        p.add_argument("--vllm-repeat", type=int, default=1)
        tail_suite(p.parse_args())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        p = argparse.ArgumentParser()
        p.add_argument("report")
        p.add_argument("--out", required=True)
        p.add_argument("inputs", nargs="+")
        a = p.parse_args()
        report(Path(a.out), [Path(x) for x in a.inputs])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=list(SUITES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--phases", help="comma-separated phases (default: all); see phases()")
    p.add_argument("--prompts", type=int, help="records per workload (default: the suite's)")
    p.add_argument("--echo-records", type=int, default=1_000_000, help="records of the echo memory run")
    run_suite(p.parse_args())


if __name__ == "__main__":
    main()
