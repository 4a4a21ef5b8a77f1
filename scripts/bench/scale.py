"""The control plane at scale (issue 15): many echo ranks on one host, the cost per batch against the number of ranks.

  python -m scripts.bench scale --out DIR [--ranks 2,8,32,64] [--modes single,sharded] [--base-rev REV]

Each job is `torchrun --nproc-per-node=N -m spmd_dp` with the echo engine, which sleeps `--delay` s per word it
returns, so ranks sleep as GPU ranks do while their engines work; every rank gets B batches of `--batch-size`
records of `--words` words. A sampler reads every rank process's CPU time every 0.2 s (psutil), so the
figures cover the generation only, not imports, rendezvous or the engine start:

  CPU per batch, all ranks   = each rank's CPU from its first request to its last token, summed / batches
  rank 0's CPU per batch     = rank 0's CPU from the first request (any rank's) to its exit, less what its
                               own batches cost a rank (the other ranks' mean), / batches: its role as rank 0
                               (commits, the journal, and in single mode the rows it writes and the final file)
  wall overhead per batch    = (span - ideal) / batches per rank (span: first request to last token over all
                               ranks; ideal: a rank's sleep)

and rank 0's ceilings are 1 / (its CPU per batch) batches a second on one core, x records and x bytes a batch.
Memory: every rank's peak RSS (psutil). `--base-rev` runs the same jobs with the code of that commit too (today's
control plane, a per-round all-gather of every rank's state), for what grew with N. Results: DIR/scale.json and
DIR/scale.md (the table of docs/scale.md).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import psutil

from scripts.bench.common import SUITES, baseline_tree, environment, tree_env
from spmd_dp.testing import REPO, clean_env, torchrun_command


class Sampler(threading.Thread):
    """Every rank process of one torchrun: its last CPU time and its peak RSS, by RANK."""

    def __init__(self, agent: psutil.Process, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.agent, self.every_s = agent, every_s
        self.cpu: Dict[int, List[Tuple[float, float]]] = {}  # RANK -> [(unix time, CPU s)]
        self.rss: Dict[int, float] = {}
        self.ranks: Dict[int, int] = {}  # pid -> RANK
        self.stop = threading.Event()
        self.errors: Dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                children = self.agent.children()
            except Exception:  # the agent has exited
                return
            for p in children:
                try:
                    if p.pid not in self.ranks:
                        rank = p.environ().get("RANK")  # read just after the fork, it is still the agent's environment
                        if rank is None:
                            continue
                        self.ranks[p.pid] = int(rank)
                    r = self.ranks[p.pid]
                    t = p.cpu_times()
                    self.cpu.setdefault(r, []).append((time.time(), t.user + t.system))
                    self.rss[r] = max(self.rss.get(r, 0.0), p.memory_info().rss / 2**20)
                except Exception as e:  # gone, or not readable yet: the next pass tries again
                    self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
                    continue
            self.stop.wait(self.every_s)

    def cpu_at(self, rank: int, when: float) -> float:
        """The rank's CPU time at `when` (linear between samples; the last sample after its exit)."""
        series = self.cpu.get(rank, [])
        if not series:
            return float("nan")
        if when >= series[-1][0]:
            return series[-1][1]
        if when <= series[0][0]:
            return series[0][1]
        i = bisect.bisect_left([t for t, _ in series], when)
        (t0, c0), (t1, c1) = series[i - 1], series[i]
        return c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def workload(path: Path, n: int, words: int) -> Path:
    """n records whose prompt has `words` words (the echo engine returns the first --words of them)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        prompt = " ".join(f"w{j:05d}" for j in range(words))
        path.write_text("".join(json.dumps({"id": i, "prompt": prompt}) + "\n" for i in range(n)))
    return path


def job(tree: Path, out: Path, label: str, n: int, batches: int, mode: str, args: argparse.Namespace) -> Dict[str, Any]:
    records = n * batches * args.batch_size
    wl = workload(out / "workloads" / f"{records}x{args.prompt_words}.jsonl", records, args.prompt_words)
    d = out / "runs" / label
    d.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(["inference_engine=echo", f"data_dir={wl.parent}", f"input_data_path={wl.name}",
                            f"output_dir={d}", "name=out", "overwrite=true", "log_level=WARNING",
                            f"batch_size={args.batch_size}", f"generation_options.max_tokens={args.words}",
                            f"engine_options.max_num_seqs={args.batch_size}",
                            f"engine_options.echo_delay_s={args.delay}", f"output_mode={mode}"], n)
    env = clean_env({**tree_env(tree), "OMP_NUM_THREADS": "1"})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(d / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(psutil.Process(proc.pid))
        sampler.start()
        code = proc.wait(timeout=args.timeout)
        sampler.stop.set()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res: Dict[str, Any] = {"label": label, "ranks": n, "batches_per_rank": batches, "mode": mode, "exit_code": code,
                           "wall_s": round(time.time() - t0, 2), "load": [round(x, 2) for x in os.getloadavg()],
                           "job_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3),
                           "rss_mb_max": round(max(sampler.rss.values(), default=0.0), 1),
                           "rss_mb_mean": round(sum(sampler.rss.values()) / max(1, len(sampler.rss)), 1),
                           "rank0_rss_mb": round(sampler.rss.get(0, 0.0), 1), "sampled_ranks": len(sampler.cpu),
                           "sampler_errors": sampler.errors}
    if code:
        res["error"] = (d / "log.txt").read_text()[-2000:]
        print(f"  {label}: FAILED\n{res['error'][-1500:]}", flush=True)
        return res
    m = json.loads((d / "out.metrics.json").read_text())
    ranks, total = m["ranks"], m["total"]
    s0 = min(r["gen_start_unix"] for r in ranks)
    res["span_s"] = round(max(r["gen_end_unix"] for r in ranks) - s0, 3)
    gen = {r["rank"]: sampler.cpu_at(r["rank"], r["gen_end_unix"]) - sampler.cpu_at(r["rank"], r["gen_start_unix"])
           for r in ranks}
    res["gen_cpu_s"] = round(sum(gen.values()), 3)
    res["rank0_cpu_s"] = round(sampler.cpu_at(0, float("inf")) - sampler.cpu_at(0, s0), 3)
    res["batches"] = sum(r["batches"] for r in ranks)
    # rank 0's CPU beyond what its own batches cost a rank (the other ranks' mean): its part as rank 0
    others = [(gen[r["rank"]], r["batches"]) for r in ranks if r["rank"] != 0]
    if others and sum(b for _, b in others):
        own = sum(c for c, _ in others) / sum(b for _, b in others) * ranks[0]["batches"]
        res["rank0_role_cpu_s"] = round(res["rank0_cpu_s"] - own, 3)
    res["ideal_s"] = round(batches * args.batch_size * args.words * args.delay, 3)
    res["records"] = total["records"]
    res["output_bytes"] = total.get("output_bytes") or sum(p.stat().st_size for p in d.glob("out/*") if p.is_file()) \
        or sum(p.stat().st_size for p in d.glob("out.*") if p.suffix in (".jsonl", ".parquet"))
    for k in ("rank0_control", "claims", "claim_s"):
        if k in total:
            res[k] = total[k]
    for f in d.glob("out*"):  # the output itself is not kept
        if f.is_dir():
            subprocess.run(["rm", "-rf", str(f)])
        elif f.suffix in (".jsonl", ".parquet") and not f.name.endswith("journal.jsonl"):
            f.unlink()
    print(f"  {label}: wall {res['wall_s']} s, span {res['span_s']} s (ideal {res['ideal_s']}), job CPU "
          f"{res['job_cpu_s']} s, generation CPU {res['gen_cpu_s']} s, rank 0 CPU {res['rank0_cpu_s']} s, RSS max "
          f"{res['rss_mb_max']} MB", flush=True)
    return res


def per_batch(run: Dict[str, Any], batch_size: int) -> Dict[str, Any]:
    """One run's figures, per batch."""
    if "error" in run:
        return {"error": True, "ranks": run["ranks"], "mode": run["mode"]}
    b = run["batches"]
    cpu, cpu0 = run["gen_cpu_s"] / b, run.get("rank0_role_cpu_s", run["rank0_cpu_s"]) / b
    res = {"ranks": run["ranks"], "mode": run["mode"], "cpu_ms_per_batch": round(cpu * 1e3, 3),
           "rank0_cpu_ms_per_batch": round(cpu0 * 1e3, 3),
           "wall_overhead_ms_per_batch": round((run["span_s"] - run["ideal_s"]) / run["batches_per_rank"] * 1e3, 2),
           "span_vs_ideal": round(run["span_s"] / run["ideal_s"], 3), "rss_mb_mean": run["rss_mb_mean"],
           "rss_mb_max": run["rss_mb_max"], "rank0_rss_mb": run["rank0_rss_mb"],
           "bytes_per_batch": round(run["output_bytes"] / b)}
    if cpu0 > 0:
        res["rank0_ceiling_batches_per_s"] = round(1 / cpu0, 1)
        res["rank0_ceiling_records_per_s"] = round(batch_size / cpu0)
        res["rank0_ceiling_mb_per_s"] = round(res["bytes_per_batch"] / cpu0 / 1e6, 1)
    if run.get("claims"):
        res["claim_ms"] = round(run["claim_s"] / run["claims"] * 1e3, 3)
    return res


def _store_client(port: int, n: int, q) -> None:
    import torch.distributed as dist
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    t0 = time.perf_counter()
    for _ in range(n):
        store.add("claims", 1)  # what a claim does
    q.put(time.perf_counter() - t0)


def store_throughput(clients: List[int], n: int = 4000) -> List[Dict[str, Any]]:
    """The rendezvous TCPStore's add()s a second with this many client processes (one server, as torchrun's)."""
    import multiprocessing as mp
    from datetime import timedelta

    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    res = []
    for c in clients:
        q = ctx.Queue()
        procs = [ctx.Process(target=_store_client, args=(server.port, n, q)) for _ in range(c)]
        for p in procs:
            p.start()
        times = [q.get() for _ in procs]
        for p in procs:
            p.join()
        res.append({"clients": c, "adds_per_s": round(c * n / max(times)), "round_trip_us": round(max(times) / n * 1e6)})
        print(f"  store: {res[-1]}", flush=True)
    return res


def scale_markdown(results: Dict[str, Any]) -> str:
    rows = ["| code | mode | ranks | CPU ms / batch (all ranks) | rank 0 CPU ms / batch | rank 0 ceiling batches/s "
            "(records/s, MB/s) | wall overhead ms / batch | span / ideal | claim ms | RSS MB mean (max) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for code, table in results["per_batch"].items():
        for r in table:
            if r.get("error"):
                rows.append(f"| {code} | {r.get('mode', '')} | {r.get('ranks', '')} | failed | | | | | | |")
                continue
            ceiling = (f"{r['rank0_ceiling_batches_per_s']} ({r['rank0_ceiling_records_per_s']}, "
                       f"{r['rank0_ceiling_mb_per_s']})" if "rank0_ceiling_batches_per_s" in r else "")
            rows.append(f"| {code} | {r['mode']} | {r['ranks']} | {r['cpu_ms_per_batch']} | {r['rank0_cpu_ms_per_batch']} "
                        f"| {ceiling} | {r['wall_overhead_ms_per_batch']} | {r['span_vs_ideal']} | "
                        f"{r.get('claim_ms', '')} | {r['rss_mb_mean']} ({r['rss_mb_max']}) |")
    return "\n".join(rows) + "\n"


def scale_suite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trees = {"new": (REPO, args.modes.split(","))}
    if args.base_rev:
        trees[f"base {args.base_rev}"] = (baseline_tree(out, args.base_rev), args.base_modes.split(","))
    results: Dict[str, Any] = {"environment": environment(SUITES["cpu"]), "args": vars(args), "runs": [],
                               "per_batch": {}}
    for n in (int(x) for x in args.ranks.split(",")):
        for code, (tree, modes) in trees.items():
            for mode in modes:
                tag = f"{code.split()[0]}_{mode}_n{n}"
                run = job(tree, out, tag, n, args.batches, mode, args)
                results["runs"].append(dict(run, code=code))
                results["per_batch"].setdefault(code, []).append(per_batch(run, args.batch_size))
                (out / "scale.json").write_text(json.dumps(results, indent=1))
    if args.store_clients:
        results["store"] = store_throughput([int(x) for x in args.store_clients.split(",")])
        (out / "scale.json").write_text(json.dumps(results, indent=1))
    (out / "scale.md").write_text(scale_markdown(results))
    print((out / "scale.md").read_text())
