"""The suite's report: phase results (DIR/phase-*.json, from one or several sessions) merged into
DIR/results.json (every figure, with the workload, versions and hardware), DIR/results.md and PNG plots.
Every figure is a ratio inside one run; a figure whose jobs did not run is left empty, never guessed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List


def report(out: Path, inputs: List[Path]) -> Dict[str, Any]:
    jobs: Dict[str, Dict[str, Any]] = {}
    echo: List[Dict[str, Any]] = []
    meta: Dict[str, Any] = {}
    for d in inputs:
        for f in sorted(Path(d).glob("phase-*.json")):
            ph = json.loads(f.read_text())
            meta = {k: ph[k] for k in ("suite", "workload", "environment")}
            echo += ph.get("echo", [])
            for j in ph.get("jobs", []):
                if j and "error" not in j:
                    jobs[j["label"]] = j
    get = lambda label, key: jobs.get(label, {}).get(key)  # noqa: E731
    a = get("a_raw_n1", "tokens_per_s")
    res: Dict[str, Any] = {**meta, "jobs": jobs, "echo": echo}
    res["scaling_efficiency"] = {}
    for label, j in jobs.items():
        if label.startswith("d_dynamic_n") and j["workload"] == "uniform" and not label.endswith(("_bsall", "_pinned")) and a:
            res["scaling_efficiency"][str(j["n"])] = round(j["tokens_per_s"] / (j["n"] * a), 4)
    res["scaling_efficiency_static"] = {str(j["n"]): round(j["tokens_per_s"] / (j["n"] * a), 4) for label, j in
                                        jobs.items() if label.startswith("c_static_n") and j["workload"] == "uniform" and a}
    res["scaling_efficiency_dp_example"] = {str(j["n"]): round(j["tokens_per_s"] / (j["n"] * a), 4) for label, j in
                                            jobs.items() if label.startswith("b_dp_example_n") and j["workload"] == "uniform" and a}
    d1, d1all = get("d_dynamic_n1", "gen_s"), get("d_dynamic_n1_bsall", "gen_s")
    res["overhead_n1"] = round(d1 / get("a_raw_n1", "gen_s") - 1, 4) if d1 and a else None
    res["startup_extra_s"] = (round(get("d_dynamic_n1", "startup_s") - get("a_raw_n1", "startup_s"), 2)
                              if d1 and a else None)
    res["batch32_vs_all"] = round(get("d_dynamic_n1", "tokens_per_s") / get("d_dynamic_n1_bsall", "tokens_per_s"), 4) \
        if d1 and d1all else None
    res.update(skew_speedup_dynamic_vs_static={}, skew_vs_ideal={}, skew_speedup_dynamic_vs_spmd_static={})
    for kind in ("sorted", "skewed"):
        b = next((j for lbl, j in jobs.items() if lbl.startswith("b_dp_example") and lbl.endswith(kind)), None)
        c = next((j for lbl, j in jobs.items() if lbl.startswith("c_static") and lbl.endswith(kind)), None)
        d = next((j for lbl, j in jobs.items() if lbl.startswith("d_dynamic") and lbl.endswith(kind)), None)
        if b and d:
            res["skew_speedup_dynamic_vs_static"][kind] = round(b["gen_s"] / d["gen_s"], 3)
            res["skew_vs_ideal"][kind] = round(d["gen_s"] / (sum(d["busy_s"]) / d["n"]), 4)
        if c and d:
            res["skew_speedup_dynamic_vs_spmd_static"][kind] = round(c["gen_s"] / d["gen_s"], 3)
    d2, pinned = get("d_dynamic_n2", "tokens_per_s"), get("d_dynamic_n1_pinned", "tokens_per_s")
    res["cpu_2ranks_vs_1rank_1core"] = round(d2 / pinned, 3) if d2 and pinned else None
    res["rank0_peak_rss_mb"] = {str(e["records"]): e["rank0_peak_rss_mb"] for e in echo}
    res["merge_mb_per_s"] = {str(e["records"]): e["merge_mb_per_s"] for e in echo}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    plots(res, out)
    print((out / "results.md").read_text())
    return res


def markdown(res: Dict[str, Any]) -> str:
    rows = ["| run | method | ranks x GPUs | workload | records | output tok/s | generation s | start-up s | "
            "per-rank busy s | imbalance |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in sorted(res["jobs"]):
        j = res["jobs"][label]
        rows.append(f"| {label} | {j['method']}{' ' + j['schedule'] if j['method'] == 'spmd' else ''} | "
                    f"{j['n']}x{j['g']} | {j['workload']} | {j['records']} | {j['tokens_per_s']:.0f} | {j['gen_s']:.1f} | "
                    f"{j['startup_s']:.1f} | {', '.join(f'{b:.1f}' for b in j['busy_s'])} | {j['imbalance']} |")
    keys = ["scaling_efficiency", "scaling_efficiency_static", "scaling_efficiency_dp_example", "overhead_n1",
            "startup_extra_s", "batch32_vs_all", "skew_speedup_dynamic_vs_static", "skew_speedup_dynamic_vs_spmd_static",
            "skew_vs_ideal", "cpu_2ranks_vs_1rank_1core", "rank0_peak_rss_mb", "merge_mb_per_s"]
    summary = "\n".join(f"- `{k}`: {json.dumps(res.get(k))}" for k in keys)
    return "\n".join(rows) + "\n\n" + summary + "\n"


def plots(res: Dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    jobs = res["jobs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    a = jobs.get("a_raw_n1", {}).get("tokens_per_s")
    for prefix, name in (("b_dp_example_n", "(b) DP example"), ("c_static_n", "(c) spmd_dp static"),
                         ("d_dynamic_n", "(d) spmd_dp dynamic")):
        pts = sorted((j["n"], j["tokens_per_s"]) for lbl, j in jobs.items()
                     if lbl.startswith(prefix) and j["workload"] == "uniform" and "bs" not in lbl)
        if prefix.startswith("d") and a:
            pts = sorted(set(pts) | {(1, jobs["d_dynamic_n1"]["tokens_per_s"])} if "d_dynamic_n1" in jobs else pts)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if a:
        ns = sorted({j["n"] for j in jobs.values()})
        ax.plot(ns, [a * n for n in ns], "k--", label="N x (a) raw vLLM")
    ax.set_xlabel("ranks (N)")
    ax.set_ylabel("output tokens/s")
    ax.legend()
    ax.set_title("Throughput vs N (uniform workload)")
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_n.png", dpi=120)
    plt.close(fig)
    skew = [(lbl, j) for lbl, j in sorted(jobs.items()) if j["workload"] != "uniform"]
    if skew:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (lbl, j) in enumerate(skew):
            for r, b in enumerate(j["busy_s"]):
                ax.bar(i + r * 0.8 / len(j["busy_s"]), b, width=0.8 / len(j["busy_s"]), color=f"C{r}")
        ax.set_xticks(range(len(skew)))
        ax.set_xticklabels([lbl.replace("_", "\n", 2) for lbl, _ in skew], fontsize=7)
        ax.set_ylabel("per-rank busy time (s)")
        ax.set_title("Skewed workloads: per-rank busy time, static vs dynamic")
        fig.tight_layout()
        fig.savefig(out / "busy_per_rank.png", dpi=120)
        plt.close(fig)
