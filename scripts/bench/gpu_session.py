"""The new capabilities on real GPUs (issue 18), on a host of 1 or 2 GPUs: jobs side by side, one per GPU.

  python -m scripts.bench gpu-session --out DIR --phases kill,structured,extras,first

Phases (the gpu suite of the bench: Llama-3.1-8B shape, dummy weights, 256 in / 256 out):
  kill        GPU 0: spmd_dp N=1 undisturbed; GPU 1: the same job, its vLLM EngineCore killed (-9) once
              3/16 of its batches are committed. Both outputs: every key once, in order. Time lost = wall
              time difference.
  structured  GPU 0: every record constrained by a JSON schema; GPU 1: the same records unconstrained.
              Every constrained output parses and fits the schema; throughput ratio (vLLM's own cost).
  extras      GPU 0: logprobs=3 (3 entries per generated token, ids that decode to the text);
              GPU 1: task=embed (vectors of the model's hidden size; equal prompts, equal vectors).
  first       launch to first request for a 1 M-record input against raw vLLM's engine start, one after
              the other on GPU 0 (the bench's scan, with the gpu suite's engine arguments).
  sharded     GPU 0: output_mode=single; GPU 1: output_mode=sharded (same records): tok/s ratio and the time
              from the last token to the job's end.
Results: DIR/gpu-session.json and one line per check on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from scripts.bench.common import SUITES, make_workload, vllm_overrides
from scripts.bench.scan import raw_engine_start, scan_job, scan_workload
from spmd_dp.models.embedded import resolve_model
from spmd_dp.testing import REPO, clean_env, journal_batches, torchrun_command

SUITE = dict(SUITES["gpu"])
# a rehearsal of the script on this machine's CPUs (2 cores: each job pinned to one), before device time is spent
REHEARSAL = dict(SUITES["cpu"], model="spmd-dp/tiny-llama", prompts=2048, prompt_len=16, max_tokens=64, max_model_len=512,
                 vllm_kwargs={})
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def spmd_job(label: str, gpu: int, out: Path, workload: Path, extra: List[str], n: int = 1) -> Dict[str, Any]:
    """torchrun -m spmd_dp on one GPU (n ranks share it only if n > 1 and the host has one GPU)."""
    d = out / "runs" / label
    d.mkdir(parents=True, exist_ok=True)
    overrides = [f"model_name={SUITE['model']}", f"data_dir={workload.parent}", f"input_data_path={workload.name}",
                 f"output_dir={d}", "name=out", "batch_size=32", "generation_options.temperature=0",
                 "generation_options.seed=null", f"generation_options.max_tokens={SUITE['max_tokens']}",
                 f"engine_options.max_model_len={SUITE['max_model_len']}", "log_level=INFO", "overwrite=true",
                 *vllm_overrides(SUITE), *extra]
    env = clean_env({"GPU_SESSION_JOB": label})  # the job's processes carry its label
    if SUITE["device"] == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cmd = torchrun_command(overrides, n)
    else:
        cmd = ["taskset", "-c", str(gpu), *torchrun_command([*overrides, "engine_options.device=cpu"], n)]
    t0 = time.time()
    tree = Path(os.environ.get("SPMD_TREE", REPO))  # another checkout of spmd_dp (a branch carried beside this one)
    with open(d / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait(timeout=1500)
    res: Dict[str, Any] = {"label": label, "gpu": gpu, "exit_code": code, "wall_s": round(time.time() - t0, 2),
                           "dir": str(d)}
    if code:
        res["error"] = (d / "log.txt").read_text()[-3000:]
        return res
    m = json.loads((d / "out.metrics.json").read_text())
    res.update(records=m["total"]["records"], output_tokens=m["total"]["output_tokens"],
               gen_s=m["total"]["generation_s"], tok_s=m["total"]["generation_tokens_per_s"],
               engine_start_s=[r["engine_start_s"] for r in m["ranks"]],
               restarts=[r.get("engine_restarts", 0) for r in m["ranks"]],
               faults=[r.get("engine_faults", []) for r in m["ranks"]],
               end_s=round(t0 + res["wall_s"] - max(r["gen_end_unix"] for r in m["ranks"]), 2))
    return res


def rows(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    d = Path(res["dir"])
    if (d / "out.jsonl").exists():
        with open(d / "out.jsonl") as f:
            return [json.loads(line) for line in f]
    import pyarrow.dataset as ds  # sharded output: a folder of shards

    return ds.dataset(str(d / "out"), format="json").to_table().to_pylist()


def keys_once_in_order(res: Dict[str, Any], n: int) -> bool:
    return [r["id"] for r in rows(res)] == list(range(n))


def side_by_side(*jobs) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = [None] * len(jobs)  # type: ignore[list-item]
    threads = [threading.Thread(target=lambda i=i, j=j: out.__setitem__(i, j())) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def kill_engine_core_when(journal: Path, label: str, batches: int, timeout: float = 900) -> Dict[str, Any]:
    """kill -9 the EngineCore process of job `label` once its journal holds `batches` batches."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        if journal_batches(journal) >= batches:
            break
        time.sleep(0.2)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "EngineCore" not in " ".join(p.info["cmdline"] or []) + p.name():
                continue
            # vLLM starts its EngineCore with an environment of its own: the job is known by its ancestors'
            if any(a.environ().get("GPU_SESSION_JOB") == label for a in p.parents()):
                p.kill()
                return {"killed_pid": p.pid, "at_unix": time.time(), "after_batches": batches}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"error": f"no EngineCore of {label} found"}


def phase_kill(out: Path, wl: Path) -> Dict[str, Any]:
    n = SUITE["prompts"]
    killer: Dict[str, Any] = {}
    extra = ["generation_options.ignore_eos=true"]

    def killed():
        t = threading.Thread(target=lambda: killer.update(kill_engine_core_when(
            out / "runs" / "kill_killed" / "out.journal.jsonl", "kill_killed", max(1, n // 32 * 3 // 16))))
        t.start()
        r = spmd_job("kill_killed", 1, out, wl, extra)
        t.join(5)
        return r

    a, b = side_by_side(lambda: spmd_job("kill_undisturbed", 0, out, wl, extra), killed)
    res = {"undisturbed": a, "killed": b, "kill": killer}
    for r in (a, b):
        r["every_key_once_in_order"] = not r["exit_code"] and keys_once_in_order(r, n)
    if not a["exit_code"] and not b["exit_code"]:
        res["time_lost_s"] = round(b["wall_s"] - a["wall_s"], 2)
    return res


def _parses_strictly(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def phase_structured(out: Path, wl: Path) -> Dict[str, Any]:
    schema_file = out / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    # a model with random weights would fill the JSON with whitespace up to max_tokens: no whitespace (engine-wide)
    base = ["generation_options.ignore_eos=false", "return_metadata=true",
            "+engine_options.vllm_kwargs.structured_outputs_config={backend:xgrammar,disable_any_whitespace:true}"]
    a, b = side_by_side(
        lambda: spmd_job("structured_schema", 0, out, wl, [*base, f"+generation_options.structured_outputs.json={schema_file}"]),
        lambda: spmd_job("structured_none", 1, out, wl, base))
    res: Dict[str, Any] = {"schema": a, "none": b}
    if not a["exit_code"]:
        bad = stopped = strict = 0
        for r in rows(a):
            if r["out_metadata"]["finish_reason"] != "stop":
                continue  # cut at max_tokens: not a whole JSON value
            stopped += 1
            try:  # xgrammar's JSON grammar lets raw control characters into strings: strict parsers refuse those
                v = json.loads(r["out"], strict=False)
                strict += _parses_strictly(r["out"])
                ok = (set(v) == {"name", "age", "tags"} and isinstance(v["name"], str) and len(v["name"]) <= 24
                      and isinstance(v["age"], int) and 0 <= v["age"] <= 150 and isinstance(v["tags"], list)
                      and len(v["tags"]) <= 4 and all(isinstance(t, str) and len(t) <= 12 for t in v["tags"]))
            except (ValueError, TypeError):
                ok = False
            bad += not ok
        res.update(schema_outputs=a["records"], schema_outputs_finished=stopped, schema_finished_invalid=bad,
                   schema_finished_strict_json=strict)
    if not a["exit_code"] and not b["exit_code"]:
        res["tok_s_ratio_schema_vs_none"] = round(a["tok_s"] / b["tok_s"], 3)
    return res


def phase_extras(out: Path, wl: Path) -> Dict[str, Any]:
    n = SUITE["prompts"]
    a, b = side_by_side(
        lambda: spmd_job("logprobs", 0, out, wl, ["generation_options.ignore_eos=true", "generation_options.max_tokens=32",
                                                  "+generation_options.logprobs=3"]),
        lambda: spmd_job("embed", 1, out, wl, ["task=embed"]))
    res: Dict[str, Any] = {"logprobs": a, "embed": b}
    if not a["exit_code"]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model(SUITE["model"]))
        ok_k = ok_ids = 0
        rs = rows(a)
        for r in rs:
            lp, ids = r["out_logprobs"], r["out_token_ids"]
            ok_k += len(lp["top_ids"]) == len(ids) == min(32, SUITE["max_tokens"]) and \
                all(len(t) == 3 for t in lp["top_ids"])
            ok_ids += tok.decode(ids, skip_special_tokens=True) == r["out"]
        res.update(logprobs_rows=len(rs), rows_with_3_per_token=ok_k, rows_whose_ids_decode_to_text=ok_ids)
    if not b["exit_code"]:
        rs = rows(b)
        hidden = json.loads((Path(resolve_model(SUITE["model"])) / "config.json").read_text())["hidden_size"]
        by_prompt: Dict[str, List[List[float]]] = {}
        for r in rs:
            by_prompt.setdefault(json.dumps(r["prompt"]), []).append(r["out"])
        res.update(embed_rows=len(rs), vectors_of_hidden_size=sum(len(r["out"]) == hidden for r in rs),
                   hidden_size=hidden,
                   equal_prompts_equal_vectors=all(max(abs(x - y) for x, y in zip(v[0], w)) < 1e-3
                                                   for v in by_prompt.values() for w in v[1:]),
                   duplicated_prompts=sum(len(v) > 1 for v in by_prompt.values()))
    for r in (a, b):
        r["every_key_once_in_order"] = not r["exit_code"] and keys_once_in_order(r, n)
    return res


def phase_first(out: Path) -> Dict[str, Any]:
    wl = scan_workload(out / "workloads", 1_000_000, 200, 16)
    raw = raw_engine_start("gpu", SUITE["model"], SUITE["vllm_kwargs"], None)
    eng = [f"model_name={SUITE['model']}", f"engine_options.max_model_len={SUITE['max_model_len']}",
           *vllm_overrides(SUITE)]
    spmd = scan_job(REPO, out, "first_1m", wl["one"].parent, wl["one"].name, 1, eng, None)
    res = {"raw": raw, "spmd": spmd}
    if "engine_ready_s" in raw and "launch_to_first_request_s" in spmd:
        res["first_request_minus_raw_start_s"] = round(spmd["launch_to_first_request_s"] - raw["engine_ready_s"], 2)
    return res


def phase_sharded(out: Path, wl: Path) -> Dict[str, Any]:
    n = SUITE["prompts"]
    extra = ["generation_options.ignore_eos=true"]
    a, b = side_by_side(lambda: spmd_job("single", 0, out, wl, [*extra, "output_mode=single"]),
                        lambda: spmd_job("sharded", 1, out, wl, [*extra, "output_mode=sharded"]))
    res: Dict[str, Any] = {"single": a, "sharded": b}
    for r in (a, b):
        r["every_key_once_in_order"] = not r["exit_code"] and keys_once_in_order(r, n)
    if not a["exit_code"] and not b["exit_code"]:
        res["tok_s_ratio_sharded_vs_single"] = round(b["tok_s"] / a["tok_s"], 3)
    return res


def gpu_session(args: argparse.Namespace) -> None:
    if args.rehearsal:
        SUITE.clear()
        SUITE.update(REHEARSAL)
    if args.prompts:
        SUITE["prompts"] = args.prompts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wl = make_workload(out / "workloads" / "uniform.jsonl", SUITE["prompts"], SUITE["prompt_len"],
                       SUITE["max_tokens"], "uniform", SUITE)
    # text prompts for the checks of outputs (vLLM's text of a token-id prompt that ends inside a UTF-8 character
    # starts with the prompt's last bytes, raw vLLM's as ours); every 8th record has record 0's prompt
    text = out / "workloads" / "text.jsonl"
    text.write_text("".join(json.dumps({"id": i, "prompt": f"Item {0 if i % 8 == 0 else i}: describe it in words, "
                                        f"with its name, its age and a few tags. " * 4}) + "\n"
                            for i in range(SUITE["prompts"])))
    path = out / "gpu-session.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.phases.split(","):
        t0 = time.time()
        print(f"phase {name}", flush=True)
        if name == "kill":
            r = phase_kill(out, wl)
        elif name == "structured":
            r = phase_structured(out, text)
        elif name == "extras":
            r = phase_extras(out, text)
        elif name == "first":
            r = phase_first(out)
        elif name == "sharded":
            r = phase_sharded(out, wl)
        else:
            raise SystemExit(f"unknown phase {name}")
        r["phase_s"] = round(time.time() - t0, 1)
        r["load"] = os.getloadavg()
        results[name] = r
        path.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}), flush=True)
        for k, v in r.items():
            if isinstance(v, dict):
                print(f"  {k}: " + json.dumps({x: y for x, y in v.items() if x not in ("error", "dir")}), flush=True)
                if "error" in v:
                    print(v["error"][-2500:], flush=True)

