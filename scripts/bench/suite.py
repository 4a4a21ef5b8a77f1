"""The throughput suite: the same workload, in the same run, through
  (a) raw vLLM: one process, one LLM(...).generate over all prompts (the per-device ceiling);
  (b) the vLLM data-parallel example's method: N independent processes, balanced static contiguous split
      (start(r) = r*floor + min(r, rem)), no coordination;
  (c) spmd_dp schedule=static;   (d) spmd_dp schedule=dynamic.
Each phase runs jobs side by side on disjoint devices (GPUs, or CPU cores) and writes DIR/phase-<name>.json; the
report (report.py) merges them. Throughput = output tokens / generation span (first rank's first request to the
last rank's last output); start-up = launch to first generation."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from scripts.bench.common import (JOB_TIMEOUT_S, PY, SUITES, engine_kwargs, environment, make_workload,
                                  vllm_overrides, wait_or_kill)
from scripts.bench.report import report
from spmd_dp.control.claims import balanced_split
from spmd_dp.testing import REPO, clean_env, torchrun_command


def raw_main(args: argparse.Namespace) -> None:
    """(a)/(b): one raw vLLM process over a contiguous share [start, stop) of the workload."""
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
    env = clean_env({"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "INFO")})
    if suite["device"] == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots))
    return env


def _start(job: Job, suite: Dict[str, Any], d: Path, wl: Dict[str, Path], log) -> List[subprocess.Popen]:
    """The job's processes: N raw vLLM processes over contiguous shares, or one torchrun of spmd_dp."""
    procs = []
    if job.method in ("raw", "dp_example"):
        n_records = sum(1 for _ in open(wl[job.workload]))
        for r, (start, stop) in enumerate(balanced_split(n_records, job.n)):
            env = _device_env(suite, [job.slots[r]])
            if suite["device"] == "cpu":
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(job.slots[r])
                env["VLLM_CPU_KVCACHE_SPACE"] = env.get("VLLM_CPU_KVCACHE_SPACE", "1")
            cmd = [PY, "-m", "scripts.bench", "raw", "--workload", str(wl[job.workload]), "--start", str(start),
                   "--stop", str(stop), "--max-tokens", str(suite["max_tokens"]), "--result", str(d / f"raw{r}.json"),
                   "--engine-kwargs", json.dumps(engine_kwargs(suite))]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        return procs
    overrides = [f"model_name={suite['model']}", f"data_dir={wl[job.workload].parent}",
                 f"input_data_path={wl[job.workload].name}", f"output_dir={d}", "name=out",
                 f"schedule={job.schedule}", f"batch_size={job.batch_size}", f"inference_engine={job.engine}",
                 "generation_options.temperature=0", "generation_options.ignore_eos=true",
                 "generation_options.seed=null", f"generation_options.max_tokens={suite['max_tokens']}",
                 f"engine_options.max_model_len={suite['max_model_len']}",
                 f"engine_options.gpus_per_dp_rank={job.g}", "log_level=INFO", "overwrite=true", *job.extra,
                 *vllm_overrides(suite)]
    if suite["device"] == "cpu":
        overrides += ["engine_options.device=cpu", "engine_options.cpu_cores_per_dp_rank=1"]
    # a fixed master port per job: jobs side by side get disjoint vLLM port ranges (derived from it)
    cmd = torchrun_command(overrides, job.n, master_port=29600 + 10 * (job.slots[0] if job.slots else 0))
    if job.pin:
        cmd = ["taskset", "-c", ",".join(map(str, job.slots)), *cmd]
    return [subprocess.Popen(cmd, cwd=REPO, env=_device_env(suite, job.slots), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)]


def run_job(job: Job, suite: Dict[str, Any], run_dir: Path, wl: Dict[str, Path]) -> Dict[str, Any]:
    """Start a job, wait for it, return its figures."""
    d = run_dir / job.label
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(d / "log.txt", "w") as log:
        procs = _start(job, suite, d, wl, log)
        sampler = GpuSampler(procs) if suite["device"] == "cuda" else None
        codes = [wait_or_kill(p, t0 + JOB_TIMEOUT_S) for p in procs]
        if sampler:
            sampler.stop()
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
        res["physical_gpus"] = physical_gpus_from_log(text)
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


def physical_gpus_from_log(text: str) -> Dict[str, str]:
    """Each rank's "physical GPUs (index:name:uuid:bus)" log line, by rank."""
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
    cmd = torchrun_command(["inference_engine=echo", f"data_dir={d}", "input_data_path=in.jsonl", f"output_dir={d}",
                            "name=out", "generation_options.max_tokens=170", "batch_size=256", "log_level=WARNING"],
                           2, master_port=29690)
    with open(d / "log.txt", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=log).returncode
    m = json.loads((d / "out.metrics.json").read_text())["total"] if code == 0 else {}
    res = {"records": records, "exit_code": code, "wall_s": round(time.time() - t0, 1),
           "rank0_peak_rss_mb": m.get("rank0_peak_rss_mb"), "merge_mb_per_s": m.get("merge_mb_per_s"),
           "output_bytes": m.get("output_bytes")}
    for p in (wl, d / "out.jsonl"):
        p.unlink(missing_ok=True)
    print(f"  echo {records} records: {res}", flush=True)
    return res


def workload_info(suite: Dict[str, Any]) -> Dict[str, Any]:
    return {k: suite[k] for k in ("model", "prompts", "prompt_len", "max_tokens", "skew_median", "skew_cap")} | {
        "sampling": "greedy, ignore_eos", "skewed": "max_tokens ~ lognormal(median, sigma=1), capped; sorted = "
                                                    "longest first"}


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
            res: Dict[str, Any] = {"echo": [echo_memory(out, n) for n in (args.echo_records // 10, args.echo_records)]}
        else:
            jobs = all_phases[name]
            print(f"phase {name}: {[j.label for j in jobs]}", flush=True)
            results: List[Dict[str, Any]] = [None] * len(jobs)  # type: ignore[list-item]

            def go(i: int, job: Job) -> None:
                results[i] = run_job(job, suite, out / "runs", wl)

            threads = [threading.Thread(target=go, args=(i, j)) for i, j in enumerate(jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            res = {"jobs": results}
        res.update(phase=name, suite=args.suite, workload=workload_info(suite), environment=env_info)
        (out / f"phase-{name}.json").write_text(json.dumps(res, indent=1))
    report(out, [out])
