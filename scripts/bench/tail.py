"""The tail (issue 15): claims that shrink as the work runs out, and that hold back while engines start, against
today's fixed claim target. Echo engine at N=4 (one engine's late start; a sorted skewed workload) and real vLLM
CPU at N=2 (the cpu suite's sorted workload). Figure: span / ideal, the ideal being every rank ending together
once its engine is up: (sum of busy + sum of the ranks' start offsets) / N (= total work / N when the engines start
together)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

from scripts.bench.common import JOB_TIMEOUT_S, SUITES, baseline_tree, environment, make_workload, tree_env, \
    vllm_overrides
from spmd_dp.testing import REPO, spmd

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
    """A run's span against its ideal, from its metrics.json."""
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
    t0 = time.time()
    p = spmd([f"data_dir={workload.parent}", f"input_data_path={workload.name}", f"output_dir={d}", "name=out",
              "overwrite=true", "log_level=INFO", *overrides], nproc, cwd=tree, env=tree_env(tree), timeout=JOB_TIMEOUT_S)
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
               f"generation_options.max_tokens={suite['max_tokens']}", *vllm_overrides(suite)]
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
