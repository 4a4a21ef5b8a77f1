"""GPU verification table: for each layout, which physical GPUs each rank got, whether its vLLM
engine processes really ran there, whether the output is complete and in order, and throughput.

  python -m scripts.bench gpu-verify --run --out DIR        run the layouts (the gpu suite) then write
  python -m scripts.bench gpu-verify --out DOC.md RESULTS_DIR...   write the table from bench results

Layouts on a 4-GPU host: 1x1, 2x1, 1x2 (TP 2), 4x1 and the seed's 2x2 (ranks x GPUs per rank).
A rank's expected GPUs are [r*g, (r+1)*g) of CUDA_VISIBLE_DEVICES; "logged" is what spmd_dp
reported through NVML ("physical GPUs" line), "engine" is where nvidia-smi saw the processes
under that rank (its vLLM EngineCore/workers) while the job ran.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from spmd_dp.testing import REPO

LAYOUT_PHASES = "p1,p2,p3,p4,p8"


def rank_rows(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    g, slots = job["g"], job["slots"]
    logged = job.get("physical_gpus", {})
    engine = job.get("engine_pids_by_gpu", {})
    # results taken before the sampler told side-by-side jobs apart: keep the GPUs of this job only
    own = {e.split(":")[2] for v in logged.values() for e in v.split(", ") if e.count(":") >= 2}
    rows = []
    for r in range(job["n"]):
        expected = [str(x) for x in slots[r * g:(r + 1) * g]]
        entries = [e.split(":") for e in logged.get(str(r), "").split(", ") if e]
        indices = [e[0] for e in entries]
        uuids = [e[2] for e in entries if len(e) > 2]
        seen = [u for u in engine.get(str(r), []) if u in own]
        ok = indices == expected and bool(seen) and set(seen) <= set(uuids)
        rows.append({"rank": r, "expected": expected, "logged": indices, "engine_gpus": [u[:12] for u in seen],
                     "ok": ok, "busy_s": job["busy_s"][r],
                     "tok_s": round(job["rank_output_tokens"][r] / job["busy_s"][r], 1) if job["busy_s"][r] else 0})
    return rows


def load_jobs(d: Path) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any], Dict[str, Any]]:
    jobs: Dict[str, Dict[str, Any]] = {}
    env: Dict[str, Any] = {}
    workload: Dict[str, Any] = {}
    for f in sorted(Path(d).glob("phase-*.json")):
        ph = json.loads(f.read_text())
        env, workload = ph["environment"], ph["workload"]
        for j in ph.get("jobs", []):
            if j and j["method"] == "spmd" and j["workload"] == "uniform" and "error" not in j:
                jobs[j["label"]] = j
    return jobs, env, workload


def section(d: Path) -> List[str]:
    """The tables of one session (one bench results folder)."""
    jobs, env, workload = load_jobs(d)
    machine = env.get("gpus", "?").splitlines()
    lines = [
        f"## {d.name}",
        "",
        f"Machine: {len(machine)} x {machine[0].split(',')[0] if machine else '?'} "
        f"(driver {machine[0].split(',')[-1].strip() if machine else '?'}), vLLM {env.get('vllm')}, "
        f"torch {env.get('torch')}. Model: {workload.get('model')} (Llama-3.1-8B shape, load_format=dummy); "
        f"{workload.get('prompts')} prompts of {workload.get('prompt_len')} tokens, {workload.get('max_tokens')} "
        f"output tokens each (greedy, ignore_eos). Results: `{d}`.",
        "",
        "| layout (ranks x GPUs) | run | records | output complete + ordered | output tok/s | rank | GPUs expected "
        "| GPUs logged by the rank | GPUs of its engine processes (nvidia-smi) | ok | busy s | rank tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(jobs.values(), key=lambda j: (j["n"] * j["g"], j["n"], j["label"]))
    for j in order:
        for i, row in enumerate(rank_rows(j)):
            head = (f"| {j['n']}x{j['g']} | {j['label']} | {j['records']} | {j['output_complete_and_ordered']} | "
                    f"{j['tokens_per_s']:.0f} |") if i == 0 else "| | | | | |"
            lines.append(f"{head} {row['rank']} | {','.join(row['expected'])} | {','.join(row['logged'])} | "
                         f"{', '.join(row['engine_gpus'])} | {'yes' if row['ok'] else 'NO'} | {row['busy_s']:.1f} | "
                         f"{row['tok_s']:.0f} |")
    lines += ["", "vLLM ports: the ports the engines' workers bound for torch.distributed (vLLM's "
              "`distributed_init_method`, from its INFO log), against each rank's range:", "",
              "| run | ranks x GPUs | per-rank port ranges | engine init ports | one per rank, inside its range |",
              "|---|---|---|---|---|"]
    for j in order:
        ranges = [(int(lo), int(hi)) for _, lo, hi in j.get("vllm_port_ranges", [])]
        ports = j.get("engine_init_ports", [])
        # an engine's tensor-parallel workers all log the engine's one port: one distinct port per rank
        distinct = sorted(set(ports))
        per_range = [sum(lo <= p <= hi for p in distinct) for lo, hi in ranges]
        ok = len(distinct) == j["n"] and per_range == [1] * len(ranges)
        logged = ", ".join(map(str, distinct)) or "(none: vLLM 0.26 with fork uses a file store)"
        lines.append(f"| {j['label']} | {j['n']}x{j['g']} | {', '.join(f'{lo}-{hi}' for lo, hi in sorted(ranges))} | "
                     f"{logged} | {'yes' if ok else 'n/a' if not ports else 'NO'} |")
    return lines + [""]


def write_doc(out: Path, inputs: List[Path]) -> str:
    lines = ["# GPU verification", "",
             "Every row is one real `torchrun -m spmd_dp` run with vLLM on NVIDIA GPUs, produced by "
             "`python -m scripts.bench gpu-verify` from `python -m scripts.bench suite gpu` results (rerun: "
             "`python -m scripts.bench gpu-verify --run --out DIR` on a 4-GPU host; see docs/gpu-notes.md). A rank's "
             "expected GPUs are [r*g, (r+1)*g) of the CUDA_VISIBLE_DEVICES its job was given; \"logged\" is what "
             "the rank reported (NVML), \"engine processes\" is where nvidia-smi saw the processes under that rank "
             "while it ran. Each rank's engine scans for ports only inside its own range (VLLM_PORT = base + "
             "local_rank x 100), so engines that start together cannot race for a port (vLLM #43206, #39015).", ""]
    for d in inputs:
        lines += section(d)
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def gpu_verify(args: argparse.Namespace) -> None:
    if args.run:
        subprocess.run([sys.executable, "-m", "scripts.bench", "suite", "gpu", "--out", args.out, "--phases",
                        LAYOUT_PHASES], cwd=REPO, check=True)
        print(write_doc(Path(args.out) / "gpu-verification.md", [Path(args.out)]))
    else:
        print(write_doc(Path(args.out), [Path(x) for x in args.inputs]))
