"""Preflight's projection against the real run: for each workload and world size, `preflight=true` then the same
command without it (real torchrun, real vLLM), and the error of the projected generation time (and wall time)
against what metrics.json measured. Also the projection for N read from the first world size's table (meaningful
where every rank has the same device at every N: one core per rank on CPU, one GPU per rank on GPU).

    python -m scripts.bench preflight --suite cpu --out DIR            # vLLM CPU, spmd-dp/small-llama, N=1 and 2
    python -m scripts.bench preflight --suite echo --out DIR           # the echo engine: a rehearsal, a minute
    python -m scripts.bench preflight --suite gpu --out DIR --ns 1 2 4 --model /path/to/model
                                     [--extra +engine_options.vllm_kwargs.load_format=dummy ...]

Writes DIR/results.json and DIR/results.md (the table for docs/benchmarks.md). Each job's log is DIR/<job>/log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List


from spmd_dp.preflight.project import finish_after, rank_speed
from spmd_dp.testing import REPO, clean_env, torchrun_command

SUITES: Dict[str, Dict[str, Any]] = {
    # the echo engine (a rehearsal of the script, and the estimator on an engine whose speed does not wander):
    # one request at a time, echo_delay_s a token
    "echo": dict(model="spmd-dp/tiny-llama", ns=[1, 2], prompts=3000, prompt_len=16, max_tokens=8, skew_median=4,
                 skew_cap=16, max_model_len=1024, vocab=1000, batch_size=32,
                 extra=["inference_engine=echo", "engine_options.echo_delay_s=0.0005", "engine_options.max_num_seqs=32"]),
    # vLLM CPU, one core per rank (the 2-core CI machine: N = 1, 2); 384 records are 12 engine-fulls at N=1
    "cpu": dict(model="spmd-dp/small-llama", ns=[1, 2], prompts=384, prompt_len=64, max_tokens=64, skew_median=32,
                skew_cap=256, max_model_len=1024, vocab=1000, batch_size=32,
                extra=["engine_options.device=cpu", "engine_options.cpu_cores_per_dp_rank=1",
                       "engine_options.max_num_seqs=32"]),
    # a GPU host: Llama-3.1-8B-shaped dummy weights (BENCH_MODEL or --model), 256 in / 256 out
    "gpu": dict(model=os.environ.get("BENCH_MODEL", "/tmp/dummy-llama8b"), ns=[1, 2, 4], prompts=8192,
                prompt_len=256, max_tokens=256, skew_median=128, skew_cap=1536, max_model_len=2048, vocab=120000,
                batch_size=32, extra=["+engine_options.vllm_kwargs.load_format=dummy"]),
}


def workload(path: Path, kind: str, s: Dict[str, Any], seed: int = 0) -> Path:
    """uniform: prompt_len token ids, max_tokens each (ignore_eos); skewed: max_tokens ~ log-normal(median, 1),
    capped, per record, shuffled."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(s["prompts"]):
            rec: Dict[str, Any] = {"id": i, "prompt": [rng.randrange(10, s["vocab"]) for _ in range(s["prompt_len"])]}
            if kind == "skewed":
                mt = int(min(s["skew_cap"], max(4, rng.lognormvariate(math.log(s["skew_median"]), 1.0))))
                rec["generation_options"] = {"max_tokens": mt}
            f.write(json.dumps(rec) + "\n")
    return path


def run(job: Path, n: int, overrides: List[str], timeout: float) -> float:
    import subprocess

    job.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(job / "log", "w") as log:
        p = subprocess.run(torchrun_command(overrides, n), cwd=REPO, env=clean_env(), stdout=log,
                           stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"{job.name} failed (exit {p.returncode}): see {job / 'log'}")
    return time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench preflight", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model")
    ap.add_argument("--ns", type=int, nargs="+")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--workloads", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every job")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)
    s = dict(SUITES[args.suite])
    s.update({k: v for k, v in (("model", args.model), ("ns", args.ns), ("prompts", args.prompts)) if v})
    out = args.out.resolve()
    rows = []
    for kind in args.workloads:
        inp = workload(out / "workloads" / f"{kind}.jsonl", kind, s)
        first_table = None
        for n in s["ns"]:
            job = out / f"{kind}-n{n}"
            common = [f"model_name={s['model']}", f"data_dir={inp.parent}", f"input_data_path={inp.name}",
                      f"output_dir={job}", f"batch_size={s['batch_size']}", "generation_options.temperature=0",
                      "generation_options.ignore_eos=true", "generation_options.seed=null",
                      f"generation_options.max_tokens={s['max_tokens']}",
                      f"engine_options.max_model_len={s['max_model_len']}", "overwrite=true", *s["extra"],
                      *args.extra]
            pf_s = run(job / "preflight", n, [*common, "name=pf", "preflight=true"], args.timeout)
            report = json.loads((job / "pf.preflight.json").read_text())
            proj = report["projection"]
            run_s = run(job / "run", n, [*common, "name=run"], args.timeout)
            metrics = json.loads((job / "run.metrics.json").read_text())
            total = metrics["total"]
            # the same speeds from the run's own engine starts: the speed estimate apart from the start skew of the
            # run (which preflight cannot know: it measured its own)
            cals = [c for c in report["calibration"]["ranks"] if c.get("finishes")]
            rates = [rank_speed(c)["rate"] for c in cals]
            run_starts = [metrics["ranks"][c["rank"]]["engine_start_s"] for c in cals]
            same_starts = proj["excess_s"] + finish_after(proj["output_tokens"], rates, run_starts)
            if first_table is None:
                first_table = {r["ranks"]: r for r in proj["by_world_size"]}
            cross = first_table.get(n, {}).get("generation_s")
            row = {"workload": kind, "ranks": n, "records": s["prompts"],
                   "sample_per_rank": [c.get("records") for c in report["calibration"]["ranks"]],
                   "projected_generation_s": proj["generation_s"], "actual_generation_s": total["generation_s"],
                   "error": round(proj["generation_s"] / total["generation_s"] - 1, 4),
                   "projected_with_the_runs_starts_s": round(same_starts, 1),
                   "error_with_the_runs_starts": round(same_starts / total["generation_s"] - 1, 4),
                   "engine_starts": {"preflight": [c.get("engine_start_s") for c in report["calibration"]["ranks"]],
                                     "run": [r["engine_start_s"] for r in metrics["ranks"]]},
                   "projected_from_first_n_s": cross,
                   "error_from_first_n": round(cross / total["generation_s"] - 1, 4) if cross else None,
                   "projected_output_tokens": proj.get("output_tokens"), "actual_output_tokens": total["output_tokens"],
                   "projected_wall_s": proj["wall_s"], "actual_wall_s": total["wall_s"],
                   "preflight_s": round(pf_s, 1), "run_s": round(run_s, 1), "rate_per_rank": proj["rate_per_rank"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| workload | ranks | records | sample a rank | projected generation s | actual generation s | error | "
             "projected with the run's engine starts | error | projected from the first N's table | error | "
             "projected / actual output tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cross = "" if r["projected_from_first_n_s"] is None else f"{r['projected_from_first_n_s']:.1f}"
        err2 = "" if r["error_from_first_n"] is None else f"{100 * r['error_from_first_n']:+.1f} %"
        lines.append(f"| {r['workload']} | {r['ranks']} | {r['records']} | {', '.join(map(str, r['sample_per_rank']))} "
                     f"| {r['projected_generation_s']:.1f} | {r['actual_generation_s']:.1f} | "
                     f"{100 * r['error']:+.1f} % | {r['projected_with_the_runs_starts_s']:.1f} | "
                     f"{100 * r['error_with_the_runs_starts']:+.1f} % | {cross} | {err2} | {r['projected_output_tokens']} / "
                     f"{r['actual_output_tokens']} |")
    meta = {"suite": args.suite, "settings": s, "extra": args.extra, "python": sys.version.split()[0],
            "host": os.uname().nodename, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0

