"""Prefix affinity against today's claims (issue 24): the same workload, one job after the other on the same device,
with `prefix_affinity=false` (today's order and claims) and with the default (`auto`).

  python -m scripts.bench prefix run --suite cpu --out DIR [--jobs docqa,docqa_evict,uniform] [--repeat 2]
  python -m scripts.bench prefix run --suite gpu --out DIR [--jobs n1,n1_evict,uniform] [--gpus 0]   (a GPU host)
  python -m scripts.bench prefix run --suite gpu --gpus 0,1 --jobs n2 --out DIR                       (two GPUs)
  python -m scripts.bench prefix run --suite gpu --rehearsal --out DIR    (the gpu suite's jobs, scaled down, on CPU)
  python -m scripts.bench prefix scan --out DIR [--records 20000]   (the input scan with and without prefix keys)
  python -m scripts.bench prefix report --out DIR RESULTS...         (merge results.json files into one table)

Workloads: *doc-QA*: D documents x Q questions, shuffled; a prompt is its document (L token ids) then its question
(16 token ids); short greedy outputs (`max_tokens`, `ignore_eos`). *uniform*: today's benchmark workload, random
token prompts of one length, nothing shared. Figures: records/s = records / generation span (the first rank's first
claim to the last rank's last batch: metrics.json's generation_s); per engine-second = records / the ranks' busy
seconds summed (what an engine start skew does not move); the prefix cache's hit rate per rank and in total
(metrics.json: vLLM's num_cached_tokens / prompt tokens); outputs compared record by record. DIR/results.json holds
every figure, DIR/results.md the table. On a GPU host first: scripts/gpu/setup_device.sh, source scripts/gpu/env.sh
(docs/gpu-notes.md); the model is the dummy-weight Llama-3.1-8B shape in /tmp/dummy-llama8b (BENCH_MODEL).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np


from spmd_dp.testing import REPO, clean_env, doc_qa_records, read_jsonl, torchrun_command, write_jsonl

JOB_TIMEOUT_S = float(os.environ.get("BENCH_JOB_TIMEOUT_S", "1800"))

# name -> the job: workload, ranks, engine arguments (overrides on top of the suite's)
SUITES: Dict[str, Dict[str, Any]] = {
    # vLLM CPU here: small-llama (fp32 KV: 16 KiB a token), one core per rank
    "cpu": dict(model="spmd-dp/small-llama", device="cpu", vocab=1000, max_model_len=1024, batch_size=16,
                extra=["+engine_options.vllm_kwargs.max_num_seqs=32"], jobs={
                    # the default cache (1 GiB a rank) holds every document: without affinity each is prefilled
                    # on both ranks, and again after the others evicted it
                    "docqa": dict(kind="docqa", n=2, docs=96, questions=8, doc_len=512, max_tokens=16),
                    # a cache of 64 blocks of 128 tokens (~15 documents) on each rank: the documents exceed it
                    "docqa_evict": dict(kind="docqa", n=2, docs=96, questions=8, doc_len=512, max_tokens=16,
                                        extra=["+engine_options.vllm_kwargs.num_gpu_blocks_override=64"]),
                    "uniform": dict(kind="uniform", n=2, prompts=768, prompt_len=64, max_tokens=64),
                }),
    # one H100/H200: Llama-3.1-8B shape, dummy weights (bf16 KV: 128 KiB a token; 200 x 2000 tokens = 52 GB)
    "gpu": dict(model=os.environ.get("BENCH_MODEL", "/tmp/dummy-llama8b"), device="cuda", vocab=120000,
                max_model_len=4096, batch_size=32, extra=["+engine_options.vllm_kwargs.load_format=dummy"], jobs={
                    "n1": dict(kind="docqa", n=1, docs=200, questions=8, doc_len=2000, max_tokens=32),
                    # a KV cache of ~0.42 of the GPU: the documents exceed it by far
                    "n1_evict": dict(kind="docqa", n=1, docs=200, questions=8, doc_len=2000, max_tokens=32,
                                     extra=["engine_options.gpu_memory_utilization=0.42"]),
                    "n2": dict(kind="docqa", n=2, docs=200, questions=8, doc_len=2000, max_tokens=32),
                    "uniform": dict(kind="uniform", n=1, prompts=4096, prompt_len=256, max_tokens=256),
                }),
}
# the gpu suite's jobs on this machine's CPU, scaled down (tiny-llama; one core a rank): the script rehearsed
REHEARSAL = dict(SUITES["cpu"], model="spmd-dp/tiny-llama", max_model_len=512, extra=[], jobs={
    "n1": dict(kind="docqa", n=1, docs=24, questions=8, doc_len=200, max_tokens=8),
    "n1_evict": dict(kind="docqa", n=1, docs=24, questions=8, doc_len=200, max_tokens=8,
                     extra=["+engine_options.vllm_kwargs.num_gpu_blocks_override=12"]),
    "n2": dict(kind="docqa", n=2, docs=24, questions=8, doc_len=200, max_tokens=8),
    "uniform": dict(kind="uniform", n=1, prompts=256, prompt_len=64, max_tokens=16),
})
MODES = {"off": ["prefix_affinity=false"], "auto": []}  # today's claims, then the default


def workload(path: Path, job: Dict[str, Any], vocab: int, seed: int = 0) -> Path:
    if path.exists():
        return path
    if job["kind"] == "docqa":
        records = doc_qa_records(job["docs"], job["questions"], doc_len=job["doc_len"], question_len=16, seed=seed,
                                 vocab=vocab)
    else:
        rng = random.Random(seed)
        records = [{"id": f"u{i:06d}", "prompt": [rng.randrange(10, vocab) for _ in range(job["prompt_len"])]}
                   for i in range(job["prompts"])]
    return write_jsonl(path, records)


def run_job(suite: Dict[str, Any], name: str, mode: str, out: Path, gpus: List[int], rep: int = 0) -> Dict[str, Any]:
    """One spmd_dp run (torchrun, N ranks); its figures from metrics.json."""
    job = suite["jobs"][name]
    wl = workload(out / "workloads" / f"{name}.jsonl", job, suite["vocab"])
    d = out / "runs" / f"{name}-{mode}-{rep}"
    d.mkdir(parents=True, exist_ok=True)
    overrides = [f"model_name={suite['model']}", f"data_dir={wl.parent}", f"input_data_path={wl.name}",
                 f"output_dir={d}", "name=out", "overwrite=true", f"batch_size={suite['batch_size']}",
                 "generation_options.temperature=0", "generation_options.ignore_eos=true", "generation_options.seed=null",
                 f"generation_options.max_tokens={job['max_tokens']}", f"engine_options.max_model_len={suite['max_model_len']}",
                 *suite["extra"], *job.get("extra", []), *MODES[mode]]
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if suite["device"] == "cpu":
        overrides += ["engine_options.device=cpu", "engine_options.cpu_cores_per_dp_rank=1"]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus[:job["n"]]))
    t0 = time.time()
    with open(d / "log.txt", "w") as log:
        proc = subprocess.Popen(torchrun_command(overrides, job["n"]), cwd=REPO, env=clean_env(env), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            code = proc.wait()
    res: Dict[str, Any] = {"job": name, "mode": mode, "rep": rep, "n": job["n"], "exit_code": code,
                           "wall_s": round(time.time() - t0, 1), "load_avg": os.getloadavg()[0]}
    if code:
        res["error"] = (d / "log.txt").read_text()[-3000:]
        print(f"  {name} {mode}: FAILED ({code})\n{res['error'][-1500:]}", flush=True)
        return res
    m = json.loads((d / "out.metrics.json").read_text())
    t = m["total"]
    busy = [r["busy_s"] for r in m["ranks"]]
    res.update(busy_s=busy, records_per_busy_s=round(t["records"] / max(sum(busy), 1e-9), 2))  # (start skew left out)
    res.update(records=t["records"], generation_s=t["generation_s"], records_per_s=round(t["records"] / t["generation_s"], 2),
               output_tokens_per_s=t["generation_tokens_per_s"], prompt_tokens=t["prompt_tokens"],
               hit_rate=t.get("prefix_cache_hit_rate"), imbalance=t["imbalance"],
               rank_hit_rates=[r.get("prefix_cache_hit_rate") for r in m["ranks"]],
               rank_records=[r["records"] for r in m["ranks"]], engine_start_s=[r["engine_start_s"] for r in m["ranks"]],
               order=t.get("prefix_order"))
    with open(d / "out.journal.jsonl") as f:  # the batches committed, as spans of slots
        res["batches"] = sorted(tuple(b[:2]) for e in map(json.loads, f) for b in e.get("batches", []))
    rows = read_jsonl(d / "out.jsonl")
    res["output_ids_in_input_order"] = [r["id"] for r in rows] == [r["id"] for r in read_jsonl(wl)]
    res["outputs"] = [r["out"] for r in rows]
    print(f"  {name} {mode}: {res['records_per_s']} records/s, gen {t['generation_s']:.1f}s, hit rate {res['hit_rate']}, "
          f"ranks {res['rank_records']}", flush=True)
    return res


def compare(pairs: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """The pairs (off, auto) of one job, each run one after the other: every pair's ratio and their geometric
    mean; hit rates and outputs of the first pair."""
    off, auto = pairs[0]["off"], pairs[0]["auto"]
    if any(p[m].get("exit_code") for p in pairs for m in MODES):
        return {"job": off["job"], "error": True}
    ratios = [round(p["auto"]["records_per_s"] / p["off"]["records_per_s"], 3) for p in pairs]
    busy = [round(p["auto"]["records_per_busy_s"] / p["off"]["records_per_busy_s"], 3) for p in pairs]
    differ = sum(a != b for p in pairs for a, b in zip(p["off"]["outputs"], p["auto"]["outputs"]))
    return {"job": off["job"], "n": off["n"], "ratio": round(float(np.exp(np.mean(np.log(ratios)))), 3),
            "ratios": ratios, "records_per_s": [[p[m]["records_per_s"] for m in MODES] for p in pairs],
            "busy_ratio": round(float(np.exp(np.mean(np.log(busy)))), 3), "busy_ratios": busy,
            "hit_rate": [off["hit_rate"], auto["hit_rate"]], "rank_hit_rates": [off["rank_hit_rates"],
                                                                                auto["rank_hit_rates"]],
            "outputs_differ": differ, "records": off["records"] * len(pairs),
            "same_batches": all(p["off"]["batches"] == p["auto"]["batches"] for p in pairs),
            "grouped": bool(auto.get("order") and auto["order"].get("grouped")),
            "in_input_order": all(p[m]["output_ids_in_input_order"] for p in pairs for m in MODES)}


def table(rows: List[Dict[str, Any]], device: str) -> str:
    def pct(x):
        return f"{x:.1%}" if x is not None else "-"
    out = ["| workload | N | device | records/s off -> auto | ratio | per engine-second | hit rate off -> auto (per rank) "
           "| auto grouped | outputs differ |", "|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        if c.get("error"):
            out.append(f"| {c['job']} | | {device} | failed | | | | | |")
            continue
        ranks = "; ".join("/".join(pct(x) for x in rr) for rr in c["rank_hit_rates"])
        rates = ", ".join(f"{a} -> {b}" for a, b in c["records_per_s"])
        each = f" ({', '.join(map(str, c['ratios']))})" if len(c["ratios"]) > 1 else ""
        busy = f" ({', '.join(map(str, c['busy_ratios']))})" if len(c["busy_ratios"]) > 1 else ""
        out.append(f"| {c['job']} | {c['n']} | {device} | {rates} | **{c['ratio']}x**{each} | {c['busy_ratio']}x{busy} | "
                   f"{pct(c['hit_rate'][0])} -> {pct(c['hit_rate'][1])} ({ranks}) | "
                   f"{'yes' if c['grouped'] else 'no (same batches)' if c['same_batches'] else 'no'} | "
                   f"{c['outputs_differ']} of {c['records']} |")
    return "\n".join(out)


def device_name(suite: Dict[str, Any]) -> str:
    if suite["device"] == "cuda":
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=30).stdout.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            return "GPU"
    return f"CPU ({platform.processor() or platform.machine()}), 1 core a rank"


def cmd_run(args) -> None:
    suite = REHEARSAL if args.rehearsal else SUITES[args.suite]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else [0]
    names = args.jobs.split(",") if args.jobs else list(suite["jobs"])
    results, comparisons = [], []
    for name in names:
        # one after the other; the second pair in the other order (a machine that drifts favours neither)
        pairs = [{mode: run_job(suite, name, mode, out, gpus, rep) for mode in (list(MODES)[::-1] if rep % 2 else MODES)}
                 for rep in range(args.repeat)]
        results += [p[m] for p in pairs for m in MODES]
        comparisons.append(compare(pairs))
    device = device_name(suite) + (" (rehearsal)" if args.rehearsal else "")
    for r in results:
        r.pop("outputs", None)
        r.pop("batches", None)
    (out / "results.json").write_text(json.dumps({"suite": args.suite, "rehearsal": args.rehearsal, "device": device,
                                                  "model": suite["model"], "jobs": {k: suite["jobs"][k] for k in names},
                                                  "runs": results, "comparisons": comparisons}, indent=1))
    (out / "results.md").write_text(table(comparisons, device) + "\n")
    print(table(comparisons, device))


def cmd_scan(args) -> None:
    """The input scan (one rank, in-process) with prefix keys (prefix_affinity=auto) and without (false): best of
    `--repeat` runs each, alternating."""
    from spmd_dp.config import load_config
    from spmd_dp.inputs import RecordSpec, locations, shared_scan
    from spmd_dp.prompting.prompts import PromptBuilder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.records
    inputs = {  # text doc-QA (~2 KB prompts), short unique text prompts (~300 B), token-id doc-QA (528 ids)
        "docqa_text": doc_qa_records(n // 8, 8, doc_len=300),
        "uniform_text": [{"id": i, "prompt": " ".join(f"w{i}_{j}" for j in range(40))} for i in range(n)],
        "docqa_tokens": doc_qa_records(max(1, n // 40), 8, doc_len=512, question_len=16, vocab=32000),
    }
    builder = PromptBuilder(load_config([]))
    specs = {"off": RecordSpec("id", builder.check), "auto": RecordSpec("id", builder.check, None, builder.check_keyed)}
    results = []
    for name, records in inputs.items():
        path = write_jsonl(out / f"scan-{name}.jsonl", records)
        best: Dict[str, float] = {}
        for _ in range(args.repeat):
            for mode, spec in specs.items():
                t = time.perf_counter()
                shared_scan(locations("", [str(path)]), "auto", spec, 32)
                best[mode] = min(best.get(mode, 1e9), time.perf_counter() - t)
        row = {"input": name, "records": len(records), "mb": round(path.stat().st_size / 1e6, 1),
               "records_per_s": {m: round(len(records) / s) for m, s in best.items()},
               "ratio": round(best["off"] / best["auto"], 3)}
        results.append(row)
        print(row, flush=True)
        path.unlink()
    (out / "scan.json").write_text(json.dumps(results, indent=1))


def cmd_report(args) -> None:
    rows = []
    for p in args.results:
        r = json.loads(Path(p).read_text())
        rows.append(f"### {r['device']} ({r['model']})\n\n" + table(r["comparisons"], r["device"]))
    text = "\n\n".join(rows) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench prefix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--suite", choices=list(SUITES), default="cpu")
    r.add_argument("--out", required=True)
    r.add_argument("--jobs", help="comma-separated job names of the suite (default: all)")
    r.add_argument("--gpus", help="GPU indices for the jobs (gpu suite), e.g. 0 or 0,1")
    r.add_argument("--rehearsal", action="store_true", help="the gpu suite's jobs, scaled down, on this CPU")
    r.add_argument("--repeat", type=int, default=1, help="pairs (off, auto) per job, one after the other")
    s = sub.add_parser("scan")
    s.add_argument("--out", required=True)
    s.add_argument("--records", type=int, default=20000)
    s.add_argument("--repeat", type=int, default=5)
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    p.add_argument("results", nargs="+")
    args = ap.parse_args(argv)
    {"run": cmd_run, "scan": cmd_scan, "report": cmd_report}[args.cmd](args)

