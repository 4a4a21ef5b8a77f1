"""The picture of a run: one row per rank (its engine start, each batch from claim to commit, restarts,
hand-backs, the drain) and under it the output tokens a second of the whole run, as a PNG.

Drawn by rank 0 at the end beside the output (`${name}.timeline.png`) and by `python -m spmd_dp.status DIR --plot
FILE` from the files of any run (spmd_dp/status/history.py: the journal's timing and the events). matplotlib is an
optional extra (`pip install 'spmd_dp[plots]'`); without it one line says how to get the picture. What a reader
would get wrong: a batch's bar ends when rank 0 committed it (up to a flush interval after its last request), and
its tokens are spread evenly over the bar in the lower plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from spmd_dp.log import logger
from spmd_dp.status.history import History, read_history

HOW = "pip install 'spmd_dp[plots]'"
BLUES = ("#3b75af", "#76a7d6")  # alternate batches of a rank, so that neighbours are told apart
COLORS = {"start": "#b8b8b8", "failed": "#d62728", "restart": "#d62728", "handed": "#ff9f1c", "drain": "#7b3294",
          "gave": "#222222", "end": {"done": "#2ca02c", "drained": "#7b3294", "failed": "#d62728"}}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw_run(paths) -> Optional[Path]:
    """At the end of a run: its timeline beside the output (never the run's failure)."""
    if not have_matplotlib():
        logger.info("timeline: no picture of the run without matplotlib: %s, then python -m spmd_dp.status %s %s "
                    "--plot FILE", HOW, paths.dir, paths.name)
        return None
    try:
        draw(read_history(paths).last_run(), paths.timeline)
    except Exception as e:  # a picture is not worth failing a finished run for
        logger.warning("timeline: could not draw %s: %s: %s", paths.timeline, type(e).__name__, e)
        return None
    logger.info("timeline: %s", paths.timeline)
    return paths.timeline


def _spans(h: History) -> Tuple[float, Dict[int, dict]]:
    """The run's first instant, and per rank what to draw: engine start, batches, restarts, hand-backs, give-up."""
    rows: Dict[int, dict] = {}

    def row(r: int) -> dict:
        return rows.setdefault(r, {"start": [], "failed": [], "batches": [], "restart": [], "handed": [],
                                   "handed_at": [], "gave": []})

    restarting: Dict[int, float] = {}
    for e in h.events:
        kind, t, r = e.get("event"), e.get("t", 0.0), e.get("rank")
        if r is None:
            continue
        if kind == "ready" and e.get("detail") != "restarted":
            row(r)["start"].append((t - e.get("value", 0.0), e.get("value", 0.0)))
        elif kind == "failed":
            row(r)["failed"].append((t - e.get("value", 0.0), max(e.get("value", 0.0), 0.5)))
        elif kind == "restarting":
            restarting[r] = t
        elif kind == "ready":  # restarted
            t0 = restarting.pop(r, t - e.get("value", 0.0))
            row(r)["restart"].append((t0, max(t - t0, 0.05)))
        elif kind == "handed back":
            row(r)["handed_at"].append(t)
            row(r)["handed"] += [(c, max(t - c, 0.05)) for _, c in e.get("batches", []) if c]
        elif kind == "gave up":
            row(r)["gave"].append(t)
    for r, t0 in restarting.items():  # a restart that never finished (it gave up)
        row(r)["restart"].append((t0, 0.05))
    for b in h.batches:
        if b.claimed > 0:
            row(b.rank)["batches"].append((b.claimed, max(b.committed - b.claimed, 0.01)))
    starts = [s for rw in rows.values() for k in ("start", "failed", "batches") for s, _ in rw[k]]
    starts += [r["t"] for r in h.runs]
    return (min(starts) if starts else 0.0), rows


def _lanes(spans: List[Tuple[float, float, bool]], most: int = 16) -> List[List[Tuple[float, float, bool]]]:
    """Spans (start, width, handed back) sorted by start, in lanes where none overlaps (the first lane free; past
    `most` lanes, the one that frees first)."""
    lanes: List[List[Tuple[float, float, bool]]] = []
    ends: List[float] = []
    for s, w, handed in spans:
        free = [i for i, e in enumerate(ends) if e <= s]
        i = free[0] if free else (len(lanes) if len(lanes) < most else min(range(len(ends)), key=ends.__getitem__))
        if i == len(lanes):
            lanes.append([])
            ends.append(0.0)
        lanes[i].append((s, w, handed))
        ends[i] = max(ends[i], s + w)
    return lanes


def _rate(h: History, t0: float, t1: float, bins: int = 200) -> Tuple[List[float], List[float]]:
    """Output tokens a second over [t0, t1]: each batch's tokens spread evenly over its claim-to-commit span."""
    width = max((t1 - t0) / bins, 0.25)
    n = int((t1 - t0) / width) + 1
    acc = [0.0] * n
    for b in h.batches:
        if b.claimed <= 0 or b.output_tokens <= 0:
            continue
        a, z = b.claimed - t0, max(b.committed - t0, b.claimed - t0 + 1e-3)
        per_s = b.output_tokens / (z - a)
        i = max(int(a // width), 0)
        while i < n and i * width < z:
            lo, hi = max(a, i * width), min(z, (i + 1) * width)
            if hi > lo:
                acc[i] += per_s * (hi - lo)
            i += 1
    return [(i + 0.5) * width for i in range(n)], [x / width for x in acc]


def draw(h: History, out: Path, title: Optional[str] = None) -> Path:
    from matplotlib.figure import Figure  # not pyplot: no backend, no global state (and less to import)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    t0, rows = _spans(h)
    if not rows:
        raise ValueError(f"{h.paths.journal} has no batch with its claim and commit times (written before spmd_dp "
                         f"kept them, or nothing committed yet)")
    ends = [s + w for rw in rows.values() for k in ("start", "failed", "batches", "restart", "handed")
            for s, w in rw[k]] + [e["t"] for e in h.events if e.get("event") in ("done", "drained", "failed")]
    t1 = max(ends)
    world = max(max(rows) + 1, max((r.get("world", 0) for r in h.runs), default=0))
    height = min(max(2.2, 0.32 * world + 1.2), 11.0)
    fig = Figure(figsize=(12, height + 2.6))
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [height, 2.2]})
    for r, rw in rows.items():
        y = r - 0.38
        ax.broken_barh([(s - t0, w) for s, w in rw["start"]], (y, 0.76), facecolors=COLORS["start"], hatch="///",
                       edgecolor="white", linewidth=0)
        ax.broken_barh([(s - t0, w) for s, w in rw["failed"]], (y, 0.76), facecolors=COLORS["failed"], alpha=0.5)
        spans = sorted([(s, w, False) for s, w in rw["batches"]] + [(s, w, True) for s, w in rw["handed"]])
        lanes = _lanes(spans)
        h_lane = 0.64 / max(len(lanes), 1)
        for i, lane in enumerate(lanes):  # the batches a rank holds at once, one above the other
            kept = [(s, w) for s, w, handed in lane if not handed]
            where = (y + 0.06 + i * h_lane, h_lane * 0.9)
            for k in (0, 1):
                ax.broken_barh([(s - t0, w) for s, w in kept[k::2]], where, facecolors=BLUES[k], linewidth=0)
            ax.broken_barh([(s - t0, w) for s, w, handed in lane if handed], where, facecolors="none",
                           edgecolor=COLORS["handed"], hatch="xx", linewidth=0.8)
        ax.broken_barh([(s - t0, w) for s, w in rw["restart"]], (y, 0.76), facecolors=COLORS["restart"], alpha=0.6)
        if rw["restart"]:
            ax.plot([s - t0 for s, _ in rw["restart"]], [r] * len(rw["restart"]), "x", color="black", ms=7, mew=2)
        if rw["handed_at"]:
            ax.plot([t - t0 for t in rw["handed_at"]], [r] * len(rw["handed_at"]), "<", color=COLORS["handed"],
                    ms=9, mec="black")
        if rw["gave"]:
            ax.plot([t - t0 for t in rw["gave"]], [r] * len(rw["gave"]), "s", color=COLORS["gave"], ms=8)
    drains = sorted(e["t"] for e in h.events if e.get("event") == "draining")
    end = next((e for e in reversed(h.events) if e.get("event") in ("done", "drained", "failed")), None)
    for a in (ax, ax2):
        if drains:
            a.axvspan(drains[0] - t0, t1 - t0, color=COLORS["drain"], alpha=0.08, lw=0)
            a.axvline(drains[0] - t0, color=COLORS["drain"], ls="--", lw=1.2)
        if end is not None:
            a.axvline(end["t"] - t0, color=COLORS["end"][end["event"]], lw=1.2)
    ax.set_ylim(world - 0.5, -0.5)
    ticks = list(range(world)) if world <= 32 else list(range(0, world, max(1, world // 16)))
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"rank {r}" for r in ticks], fontsize=8 if world > 16 else 9)
    ax.grid(axis="x", alpha=0.3)
    legend = [Patch(facecolor=COLORS["start"], hatch="///", edgecolor="white", label="engine start"),
              Patch(facecolor=BLUES[0], label="batch: claim to commit")]
    if any(rw["restart"] for rw in rows.values()):
        legend.append(Patch(facecolor=COLORS["restart"], label="engine restart"))
    if any(rw["handed"] for rw in rows.values()):
        legend.append(Patch(facecolor="none", edgecolor=COLORS["handed"], hatch="xx", label="handed back"))
    if any(rw["failed"] for rw in rows.values()):
        legend.append(Patch(facecolor=COLORS["failed"], alpha=0.5, label="engine failed to start"))
    if any(rw["gave"] for rw in rows.values()):
        legend.append(Line2D([], [], marker="s", ls="", color=COLORS["gave"], label="gave up"))
    if drains:
        legend.append(Line2D([], [], ls="--", color=COLORS["drain"], label="drain"))
    if end is not None:
        legend.append(Line2D([], [], color=COLORS["end"][end["event"]],
                             label={"done": "output written", "drained": "drained: stopped",
                                    "failed": "failed"}[end["event"]]))
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    xs, ys = _rate(h, t0, t1)
    ax2.fill_between(xs, ys, step="mid", alpha=0.35, color=BLUES[0])
    ax2.plot(xs, ys, drawstyle="steps-mid", color=BLUES[0], lw=1)
    ax2.set_ylabel("output tok/s")
    ax2.set_xlabel("seconds since the first rank started")
    ax2.grid(alpha=0.3)
    ax2.set_ylim(bottom=0)
    records = sum(b.records for b in h.batches)
    tokens = sum(b.output_tokens for b in h.batches)
    ax.set_title(title or f"{h.paths.name}: {records:,} records, {tokens:,} output tokens, {world} ranks, "
                          f"{t1 - t0:.1f} s", fontsize=11, loc="left")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    return out
