"""The input scan (issue 14): scan throughput and launch-to-first-request, the scan shared by the ranks against
today's (rank 0 alone, then the engines), one file and 16 shards, 1/2/4 ranks. Arms run side by side in each
repeat; the minimum over the repeats is reported (the least disturbed run is the closest to the cost)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from scripts.bench.common import (PY, SUITES, baseline_tree, engine_kwargs, environment, kill_tree, pinned, summary,
                                  tree_env)
from spmd_dp.testing import REPO, clean_env, torchrun_command

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


def scan_in_process(tree: Path, path: Path, stride: int, cpus: Optional[str]) -> Dict[str, Any]:
    """One process scans the input (no torchrun), with the code of `tree`: wall and CPU seconds, RSS growth."""
    p = subprocess.run(pinned([PY, "-c", SCAN_IN_PROCESS, str(path), str(stride)], cpus), cwd=tree,
                       capture_output=True, text=True, env=clean_env(tree_env(tree)))
    if p.returncode:
        return {"error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def scan_job(tree: Path, out: Path, label: str, data_dir: Path, input_path: str, nproc: int, extra: List[str],
             cpus: Optional[str], timeout: float = 1800) -> Dict[str, Any]:
    """torchrun -m spmd_dp (the code of `tree`) until its first request: launch-to-first-request and, from
    the log, each rank's scan time. The job is stopped at its first request (the generation is not measured)."""
    d = out / "runs" / label
    d.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command([f"data_dir={data_dir}", f"input_data_path={input_path}", f"output_dir={d}", "name=out",
                            "overwrite=true", "batch_size=256", "generation_options.max_tokens=1", *extra], nproc)
    t0 = time.time()
    proc = subprocess.Popen(pinned(cmd, cpus), cwd=tree, env=clean_env(tree_env(tree)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killer = threading.Timer(timeout, lambda: kill_tree(proc))
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
    kill_tree(proc)
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


def raw_engine_start(device_suite: str, model: str, vllm_kwargs: Dict[str, Any], cpus: Optional[str]) -> Dict[str, Any]:
    """Raw vLLM: launch to an engine ready, with the engine arguments spmd_dp passes on this device."""
    suite = dict(SUITES[device_suite], model=model, vllm_kwargs=vllm_kwargs)
    env = clean_env(tree_env(REPO))
    if suite["device"] == "cpu":
        env.update(VLLM_CPU_OMP_THREADS_BIND=(cpus or "0").split(",")[0], VLLM_CPU_KVCACHE_SPACE="1")
    p = subprocess.run(pinned([PY, "-c", RAW_START, repr(time.time()), json.dumps(engine_kwargs(suite))], cpus),
                       cwd=REPO, env=env, capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-2000:]}


def scan_arms(args: argparse.Namespace, out: Path, base: Path, wl: Dict[str, Any], n: int, ranks: List[int]):
    """The arms of one input size, by name: each a function that runs once and returns its figures."""
    cpus = args.cpus
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
        arms["vllm_raw_start"] = lambda: raw_engine_start(args.device_suite, args.model, json.loads(args.vllm_kwargs),
                                                          cpus)
    if args.arms:
        arms = {name: arm for name, arm in arms.items() if re.search(args.arms, name)}
    return arms


def scan_suite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base_tree) if args.base_tree else baseline_tree(out, args.base_rev)
    ranks = [int(r) for r in args.ranks.split(",")]
    results: Dict[str, Any] = {"environment": environment(SUITES["cpu"]), "base_rev": args.base_rev, "cpus": args.cpus,
                               "record_bytes": args.record_bytes, "shards": args.shards, "repeat": args.repeat,
                               "sizes": []}
    for n in [int(x) for x in args.records.split(",")]:
        wl = scan_workload(Path(args.workloads or out / "workloads"), n, args.record_bytes, args.shards)
        size: Dict[str, Any] = {"records": n, "bytes": wl["bytes"], "load_before": os.getloadavg()}
        print(f"scan: {n} records, {wl['bytes'] / 1e6:.0f} MB", flush=True)
        arms = scan_arms(args, out, base, wl, n, ranks)
        runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in arms}
        for rep in range(args.repeat):
            for name, arm in arms.items():
                if name.startswith("vllm") and rep >= args.vllm_repeat:
                    continue
                runs[name].append(arm())
                if name.startswith("in:"):
                    print(f"  {name}: {runs[name][-1]}", flush=True)
        size["runs"] = runs
        size["summary"] = {name: {k: summary(rs, k) for k in ("wall_s", "cpu_s", "scan_rss_mb", "scan_s", "scan_cpu_s",
                                                               "scan_cpu_s_total", "launch_to_first_request_s",
                                                               "engine_ready_s")
                                  if summary(rs, k)} for name, rs in runs.items()}
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
