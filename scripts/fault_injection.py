"""Fault injection at seeded random moments, many times over: counts faults injected, runs completed, keys
lost and keys written twice. The tests (tests/test_engine_faults.py) run a few of these in CI; this runs more.

    python scripts/fault_injection.py --runs 10                     # every echo kind, 10 seeds each
    python scripts/fault_injection.py --kinds vllm-kill9 --runs 3   # real vLLM on CPU (~2 min a run)

Kinds (3 ranks of the echo engine unless said):
  echo-die      a random rank's engine dies after a random number of steps, 1-3 times (3: it gives up and
                hands its work back; max_engine_restarts=2)
  echo-hang     a random rank's engine stops answering after a random number of steps (batch_timeout=4)
  echo-sigterm  SIGTERM to a random rank after a random number of committed batches; the rerun resumes
  vllm-kill9    2 ranks of real vLLM: kill -9 of a random rank's EngineCore after it finished 1-4 batches

A run completes when it exits 0 (echo-sigterm: when its rerun does) with the output file written; keys
are counted in that file against the input (lost: absent; duplicated: present more than once), and
batches in the log (rank 0 received one twice in a run: the journal commits it once, but it was
generated twice). A run that has not ended after 10 minutes (vLLM: 15) is a hang: it is ended, counted
(`hung`), and not completed; the other runs go on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from spmd_dp.testing import (echo_args, engine_core_pid, keys_report, launch, make_records, running,
                             wait_for_batches, wait_until, worker_pids, write_jsonl)

STARTED = []  # every torchrun this script started: ended when it ends, however it ends


def torchrun(args, nproc, log: Path):
    STARTED.append(launch(args, nproc, log=log))
    return STARTED[-1]


def ended(proc, timeout: float, hung: list):
    """The run's exit code; a run still going after `timeout` is a hang: it is ended (SIGTERM, then SIGKILL), noted
    in `hung`, and its code is None (the campaign goes on)."""
    with running(proc):
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung.append(proc.args)
            return None


def received_twice(log_text: str) -> int:
    """Batches rank 0 received more than once in one run (the journal would commit each once anyway)."""
    seen = Counter(re.findall(r"Received results for batch (\d+) from", log_text))
    return sum(1 for n in seen.values() if n > 1)


def echo_run(kind: str, seed: int, work: Path) -> dict:
    rng = random.Random(f"{kind}-{seed}")
    records = make_records(300, words=6)
    base = echo_args(work, write_jsonl(work / "in.jsonl", records), "batch_size=5", "engine_options.echo_delay_s=0.005",
                     f"schedule={rng.choice(['dynamic', 'static'])}")
    log = work / "run.log"
    victim = rng.randrange(3)
    faults = 0
    hung: list = []
    if kind in ("echo-die", "echo-hang"):
        times = rng.randint(1, 3) if kind == "echo-die" else 1
        extra = [f"engine_options.echo_fault_ranks=[{victim}]",
                 f"engine_options.echo_fault_after_steps={rng.randint(1, 30)}", f"engine_options.echo_fault_times={times}"]
        if kind == "echo-hang":
            extra += ["engine_options.echo_fault=hang", "batch_timeout=4"]
        proc = torchrun(base + extra, 3, log)
        rc = ended(proc, 600, hung)
        text = log.read_text()
        faults = text.count(": engine died: ") + text.count(": engine stalled: ")
        twice = received_twice(text)
    else:  # echo-sigterm, then the rerun
        proc = torchrun(base, 3, log)
        at = rng.randint(1, 40)
        if wait_for_batches(work / "out" / "out.journal.jsonl", at, proc, 300) >= at:
            pid = worker_pids(proc.pid).get(victim)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                faults = 1
        ended(proc, 600, hung)
        twice = received_twice(log.read_text())
        rc = ended(torchrun(base, 3, work / "rerun.log"), 600, hung)
    keys = keys_report(work / "out" / "out.jsonl", [r["id"] for r in records])
    return {"kind": kind, "seed": seed, "faults": faults, "completed": rc == 0 and (work / "out" / "out.jsonl").exists(),
            **keys, "received_twice": twice, "rc": rc, "hung": len(hung)}


def vllm_run(seed: int, work: Path) -> dict:
    rng = random.Random(f"vllm-kill9-{seed}")
    records = [{"id": f"k{i:04d}", "prompt": f"Tell me about w{i} and the day {i * 7}"} for i in range(256)]
    write_jsonl(work / "in.jsonl", records)
    args = [f"data_dir={work}", "input_data_path=in.jsonl", f"output_dir={work / 'out'}", "name=out",
            "generation_options.temperature=0", "generation_options.max_tokens=32", "+generation_options.ignore_eos=true",
            "batch_size=8", "engine_options.max_model_len=512", "engine_options.max_num_seqs=16",
            "schedule=static"]  # each rank has its half whenever its engine is up (engine starts differ by seconds)
    log = work / "run.log"
    victim, after = rng.randrange(2), rng.randint(1, 4)
    proc = torchrun(args, 2, log)
    faults = 0
    pattern = re.compile(rf"Received results for batch \d+ from rank {victim}\b")
    if wait_until(lambda: len(pattern.findall(log.read_text())) >= after, 600, proc):
        rank = worker_pids(proc.pid).get(victim)
        core = engine_core_pid(rank) if rank is not None else None
        if core is not None:
            os.kill(core, signal.SIGKILL)
            faults = 1
    hung: list = []
    rc = ended(proc, 900, hung)
    text = log.read_text()
    readd = re.search(r"re-added (\d+) requests", text)
    keys = keys_report(work / "out" / "out.jsonl", [r["id"] for r in records])
    return {"kind": "vllm-kill9", "seed": seed, "faults": faults, "completed": rc == 0, **keys,
            "received_twice": received_twice(text), "rc": rc, "hung": len(hung), "victim": victim,
            "re_added": int(readd.group(1)) if readd else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="echo-die,echo-hang,echo-sigterm")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--keep", help="keep each run's folder (logs, outputs) under this directory")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run_all(args)
    finally:
        for proc in STARTED:
            if proc.poll() is None:
                proc.terminate()  # torchrun passes SIGTERM to its workers
                proc.wait(timeout=60)


def run_all(args) -> int:
    results = []
    for kind in args.kinds.split(","):
        for seed in range(args.first_seed, args.first_seed + args.runs):
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
                work = Path(args.keep) / f"{kind}-{seed}" if args.keep else Path(tmp)
                work.mkdir(parents=True, exist_ok=True)
                t0 = time.monotonic()
                r = vllm_run(seed, work) if kind == "vllm-kill9" else echo_run(kind, seed, work)
                r["s"] = round(time.monotonic() - t0, 1)
            print(json.dumps(r), flush=True)
            results.append(r)
    print(f"\n{'kind':<14}{'runs':>6}{'faults':>8}{'completed':>11}{'keys lost':>11}{'duplicated':>12}"
          f"{'batches sent twice':>20}")
    for kind in args.kinds.split(","):
        rs = [r for r in results if r["kind"] == kind]
        print(f"{kind:<14}{len(rs):>6}{sum(r['faults'] for r in rs):>8}{sum(r['completed'] for r in rs):>11}"
              f"{sum(r['lost'] for r in rs):>11}{sum(r['duplicated'] for r in rs):>12}"
              f"{sum(r['received_twice'] for r in rs):>20}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    bad = [r for r in results if not r["completed"] or r["lost"] or r["duplicated"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
