"""What preflight found, as `${name}.preflight.json` (`build_report`) and as the summary it prints (`summary`).

The fields are documented in docs/observability.md. Secrets in the config are masked (spmd_dp/redact.py).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Dict, List

import numpy as np

from spmd_dp.config import task_list
from spmd_dp.preflight.project import project
from spmd_dp.redact import scrub
from spmd_dp.status.show import hms

PREFLIGHT_VERSION = 1


def _fate(actions: Dict[str, int], cfg) -> List[str]:
    """What the run does with the records that do not fit, one phrase per way."""
    out = []
    if actions.get("refused"):
        then = ("the run stops at the first of them (on_bad_record=fail)" if cfg.on_bad_record == "fail" else
                "they go to the errors file (on_bad_record=skip)")
        out.append(f"{actions['refused']:,} refused by the engine (on_long_prompt=fail): {then}; set "
                   f"on_long_prompt=truncate_left (or skip), raise engine_options.max_model_len or lower max_tokens")
    if actions.get("skipped"):
        out.append(f"{actions['skipped']:,} skipped to the errors file (on_long_prompt=skip)")
    if actions.get("truncated"):
        out.append(f"{actions['truncated']:,} truncated to max_model_len - max_tokens prompt tokens "
                   f"(on_long_prompt={cfg.on_long_prompt})")
    if actions.get("clamped"):
        out.append(f"{actions['clamped']:,} run with max_tokens lowered to what the context leaves (clamp_max_tokens)")
    if actions.get("cut"):
        out.append(f"{actions['cut']:,} run, their output stopped at the end of the context (finish_reason length; "
                   f"clamp_max_tokens=true or on_long_prompt=truncate_left keep max_tokens)")
    return out


def build_report(node, scanned, shares: List[Dict[str, Any]], sample: np.ndarray, every: int,
                 cals: List[Dict[str, Any]], seconds: float) -> Dict[str, Any]:
    cfg, plan = node.cfg, node.plan
    index = scanned.index
    n = index.n_records
    parts = [s["share"] for s in shares]
    actions: Counter = Counter()
    options: Counter = Counter()
    for p in parts:
        actions.update(p["actions"])
        options.update(p["options"])
    first = sorted((f for p in parts for f in p["first"]), key=lambda f: f[0])[:10]
    not_fitting = sum(p["not_fitting"] for p in parts)
    limit, limit_source = shares[0]["limit"], shares[0]["limit_source"]
    kinds = Counter(f.kind + (f"+{f.compression}" if f.compression else "") for f in index.files)
    tasks = task_list(cfg.task)
    generate = "generate" in tasks
    records_to_run = n - scanned.n_bad - actions.get("refused", 0) - actions.get("skipped", 0)
    cuda = plan.device.kind == "cuda"
    devices_per_rank = plan.device.tensor_parallel_size if cuda else 1
    ran = [c for c in cals if "error" not in c]
    projection = project(ran, records_to_run, plan.world_size, devices_per_rank,
                         max((c.get("engine_start_s", 0.0) for c in cals), default=0.0), scanned.seconds,
                         cfg.preflight.gpu_hour_price, generate, sum(p["budget"] for p in parts))
    tokens: Dict[str, Any] = {
        "counted": "every record" if every == 1 else f"a uniform sample: every {every}th record",
        "records": int(sample.size), "tokenized": sum(p["tokenized"] for p in parts),
        "tokenizer": shares[0]["tokenizer"], "seconds": max(p["seconds"] for p in parts)}
    if sample.size:
        pct = np.percentile(sample, [50, 90, 99])
        tokens.update(p50=int(pct[0]), p90=int(pct[1]), p99=int(pct[2]), max=int(sample.max()),
                      mean=round(float(sample.mean()), 1), total_estimate=round(float(sample.mean()) * (n - scanned.n_bad)))
    return {
        "spmd_dp_preflight": PREFLIGHT_VERSION, "name": cfg.name, "created_unix": round(time.time(), 3),
        "seconds": round(seconds, 1),
        "world_size": plan.world_size, "device": plan.device.describe(), "devices_per_rank": devices_per_rank,
        "device_kind": plan.device.kind,
        "config": {k: v for k, v in scrub(cfg).items() if k in (
            "model_name", "inference_engine", "data_dir", "input_data_path", "output_dir", "task", "batch_size",
            "schedule", "on_long_prompt", "on_bad_record", "clamp_max_tokens", "generation_options", "preflight")},
        "input": {"files": len(index.files), "kinds": dict(kinds), "bytes": index.size, "records": n,
                  "bad_records": scanned.n_bad, "scan_s": round(scanned.seconds, 2)},
        "options": dict(sorted(options.items())),
        "prompt_tokens": tokens,
        "context": {"max_model_len": limit, "source": limit_source, "max_tokens": cfg.generation_options.max_tokens,
                    "on_long_prompt": cfg.on_long_prompt, "not_fitting": not_fitting, "actions": dict(actions),
                    "first": [{"position": f[0], "key": f[1], "prompt_tokens": f[2], "max_tokens": f[3],
                               "action": f[4]} for f in first],
                    "what_happens": _fate(actions, cfg)},
        "calibration": {"sample_records": cfg.preflight.sample_records, "ranks": cals},
        "projection": projection,
    }


def _num(x: float) -> str:
    """A figure as a reader takes it in: 12,345.6 / 3.14 / 0.0021."""
    return f"{x:,.1f}" if abs(x) >= 10 else (f"{x:.2f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2g}")


def summary(r: Dict[str, Any]) -> str:
    """The report as a few lines (what `preflight=true` prints)."""
    cfg, inp, tok, ctx, proj = r["config"], r["input"], r["prompt_tokens"], r["context"], r["projection"]
    unit = "GPU" if r["device_kind"] == "cuda" else "rank"
    ranks = f"{r['world_size']} rank" + ("s" if r["world_size"] > 1 else "")
    where = f"{ranks} on {r['device']}" if r["world_size"] == 1 else f"{ranks}, rank 0 on {r['device']}"
    lines = [f"spmd_dp preflight of {r['name']}: {where} ({cfg['inference_engine']}, "
             f"{cfg['model_name']}); took {hms(r['seconds'])}"]
    kinds = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in inp["kinds"].items())
    lines.append(f"  input        {inp['records']:,} records in {inp['files']} files ({kinds}, {inp['bytes'] / 1e6:,.1f} MB)"
                 + (f"; {inp['bad_records']:,} bad records skipped" if inp["bad_records"] else ""))
    opts = ", ".join(f"{k} {v:,}" for k, v in r["options"].items())
    lines.append(f"  options      {opts or 'none'}")
    if "p50" in tok:
        lines.append(f"  prompt       tokens p50 {tok['p50']:,}  p90 {tok['p90']:,}  p99 {tok['p99']:,}  max "
                     f"{tok['max']:,}  mean {tok['mean']:,}  ({tok['counted']}: {tok['records']:,} records; "
                     f"{tok['tokenizer']})")
    limit = ctx["max_model_len"]
    if limit is None:
        lines.append(f"  context      no limit known ({ctx['source']})")
    elif not ctx["not_fitting"]:
        own = " (unless a record sets its own)" if r["options"].get("own generation_options") else ""
        lines.append(f"  context      every prompt fits max_model_len {limit:,} ({ctx['source']}) with max_tokens "
                     f"{ctx['max_tokens']:,}{own}")
    else:
        keys = ", ".join(str(f["key"]) for f in ctx["first"][:5])
        lines.append(f"  context      {ctx['not_fitting']:,} records do not fit max_model_len {limit:,} ({ctx['source']}) "
                     f"with their max_tokens (first: {keys}{', ...' if ctx['not_fitting'] > 5 else ''}):")
        lines += [f"                 {w}" for w in ctx["what_happens"]]
    cal = r["calibration"]["ranks"]
    failed = [c for c in cal if "error" in c]
    if "error" in proj:
        lines.append(f"  projection   {proj['error']}" + (f" ({failed[0]['error']})" if failed else ""))
        return "\n".join(lines)
    rate = proj["rate_per_rank"]
    per = "output tokens" if proj["unit"] == "output tokens" else "records"
    lines.append(f"  engine       {sum(c.get('records', 0) for c in cal):,} sample records: {rate['mean']:,.1f} {per}/s a "
                 f"rank (min {rate['min']:,.1f}, max {rate['max']:,.1f}); {proj['per_record']:,} {per} a record; engine "
                 f"start {hms(proj['engine_start_s'])}" + (f"; {len(failed)} ranks could not start theirs" if failed else ""))
    cost = f", cost {_num(proj['cost'])} at {r['config']['preflight']['gpu_hour_price']:g} a {unit}-hour" \
        if proj.get("cost") is not None else ""
    lines.append(f"  projection   {proj['records_to_run']:,} records: generation {hms(proj['generation_s'])} at "
                 f"{ranks}{' (as their engines started)' if r['world_size'] > 1 else ''}, wall {hms(proj['wall_s'])} with the start; "
                 f"{_num(proj['device_hours'])} {unit}-hours{cost}")
    lines.append(f"  {'ranks':>11}  {'generation':>10}  {'wall':>10}  {unit + '-hours':>10}" +
                 ("  cost" if proj.get("cost") is not None else ""))
    for row in proj["by_world_size"]:
        mark = " <" if row["ranks"] == r["world_size"] else ""
        lines.append(f"  {row['ranks']:>11}  {hms(row['generation_s']):>10}  {hms(row['wall_s']):>10}  "
                     f"{_num(row['device_hours']):>10}" + (f"  {_num(row['cost'])}" if row.get("cost") is not None
                                                             else "") + mark)
    return "\n".join(lines)
