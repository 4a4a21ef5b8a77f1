"""A run as its files tell it, read only: the journal (what is committed, and when each batch was claimed and
committed), the events rank 0 wrote (spmd_dp/status/live.py), the last status; and whether it still runs.

For `python -m spmd_dp.status` and the timeline. Nothing here writes. The one thing a reader would get wrong:
a status file that says "generating" may be a dead run's last word; `running` decides (the writer's process on
this host, or a status updated lately on another host).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from spmd_dp.output.journal import read_entries
from spmd_dp.output.paths import OutputPaths
from spmd_dp.status.live import STATUS_EVERY_S, TERMINAL
from spmd_dp.status.show import hms

STALE_S = max(30.0, 10 * STATUS_EVERY_S)  # a status from another host not updated for this long: the run is gone


@dataclass
class BatchSpan:
    index: int
    rank: int
    claimed: float  # unix
    committed: float  # unix
    records: int
    output_tokens: int


@dataclass
class History:
    paths: OutputPaths
    total: Optional[int] = None  # the input's records (the journal's header)
    committed: int = 0  # records committed, all runs
    complete: bool = False  # the final output is written
    batches: List[BatchSpan] = field(default_factory=list)  # with timing, in commit order
    untimed: int = 0  # committed batches without timing (written before spmd_dp kept it)
    events: List[Dict[str, Any]] = field(default_factory=list)  # the events file's lines
    runs: List[Dict[str, Any]] = field(default_factory=list)  # its "run" lines: one per start

    def last_run(self) -> "History":
        """The same history cut to the last start (batches committed and events since)."""
        if not self.runs:
            return self
        t0 = self.runs[-1]["t"]
        return History(self.paths, self.total, self.committed, self.complete,
                       [b for b in self.batches if b.committed >= t0], self.untimed,
                       [e for e in self.events if e.get("t", 0) >= t0], self.runs[-1:])


def names(output_dir: Path) -> List[str]:
    """The runs in a folder: the names of its journals and status files."""
    found = set()
    for p in Path(output_dir).iterdir():
        for suffix in (".journal.jsonl", ".status.json"):
            if p.name.endswith(suffix) and not p.name.startswith("."):
                found.add(p.name[:-len(suffix)])
    return sorted(found)


def read_history(paths: OutputPaths) -> History:
    h = History(paths)
    if paths.journal.exists():
        entries = read_entries(paths.journal)
        if entries and "fingerprint" in entries[0]:
            h.total = entries[0]["fingerprint"].get("n_records")
        spans: Dict[int, int] = {}
        for e in entries[1:]:
            h.complete = h.complete or bool(e.get("complete"))
            rows = e.get("batches") or e.get("shards") or []
            timing = e.get("timing") or []
            for k, row in enumerate(rows):
                start, stop = int(row[0]), int(row[1])
                if start in spans:
                    continue
                spans[start] = stop
                if k < len(timing):
                    index, rank, claimed, tokens = timing[k]
                    h.batches.append(BatchSpan(int(index), int(rank), float(claimed), float(e["t"]), stop - start,
                                               int(tokens)))
                else:
                    h.untimed += 1
        h.committed = sum(stop - start for start, stop in spans.items())
    if paths.events.exists():
        with open(paths.events) as f:
            for line in f:
                try:
                    h.events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line
        h.runs = [e for e in h.events if e.get("event") == "run"]
    return h


def read_status(paths: OutputPaths) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(paths.status.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def running(status: Optional[Dict[str, Any]], now: Optional[float] = None) -> Tuple[bool, str]:
    """Does the run that wrote this status still run? (yes/no, and why not)."""
    if status is None:
        return False, "no status file"
    if status.get("phase") in TERMINAL:
        return False, f"it ended ({status['phase']})"
    now = time.time() if now is None else now
    age = now - status.get("updated_unix", 0)
    pid, host = status.get("pid"), status.get("host")
    if host == socket.gethostname() and pid:
        if not _alive(int(pid)):
            return False, f"its rank 0 (pid {pid} on {host}) is gone; its last status is {hms(age)} old"
        return True, ""
    if age > STALE_S:
        return False, f"its status has not been updated for {hms(age)} (rank 0 was pid {pid} on {host})"
    return True, ""


def _alive(pid: int) -> bool:
    """A process of that pid exists and is spmd_dp's (not a pid used again)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid
    return b"spmd_dp" in cmdline


def reconstruct(paths: OutputPaths, status: Optional[Dict[str, Any]], why: str) -> Dict[str, Any]:
    """The status of a run that does not run (any more): what the journal says is committed, per rank from its
    timing, and the last status's rows where there is one."""
    h = read_history(paths)
    total = h.total if h.total is not None else (status or {}).get("records", {}).get("total", 0)
    out: Dict[str, Any] = dict(status or {"name": paths.name, "output_dir": str(paths.dir), "world_size": None,
                                          "hosts": [], "errors": [], "output_tokens": None, "ranks": []})
    last_phase = out.get("phase")
    out.update(running=False, not_running=why, last_phase=last_phase,
               phase="done" if h.complete else (last_phase if last_phase in TERMINAL else "not running"),
               records={"done": h.committed, "total": total, "left": (total or 0) - h.committed,
                        "before": (status or {}).get("records", {}).get("before", 0)},
               eta_s=None, tokens_per_s={"last_minute": 0.0, "overall": (status or {}).get(
                   "tokens_per_s", {}).get("overall", 0.0)})
    last = {r["rank"]: r for r in out.get("ranks") or []}
    per: Dict[int, Dict[str, Any]] = {}
    for b in h.batches:  # what is committed, per rank, from the journal (the last status may be behind it)
        row = per.setdefault(b.rank, {"rank": b.rank, "host": "", "state": "?", "engine_restarts": 0,
                                      "last_heartbeat_unix": None, **last.get(b.rank, {}),
                                      "batches": 0, "records": 0, "output_tokens": 0, "heartbeat_age_s": None})
        row["batches"] += 1
        row["records"] += b.records
        row["output_tokens"] += b.output_tokens
    out["ranks"] = [per.get(r, {**last[r], "batches": 0, "records": 0, "output_tokens": 0}) if r in last
                    else per[r] for r in sorted(set(per) | set(last))]
    if h.batches:
        out["output_tokens"] = sum(b.output_tokens for b in h.batches)
    return out


def current_status(paths: OutputPaths) -> Dict[str, Any]:
    """The status as `python -m spmd_dp.status` shows it: the live one, or the reconstruction of a run that is gone."""
    status = read_status(paths)
    alive, why = running(status)
    if alive:
        return status
    if status is not None and status.get("phase") in TERMINAL:
        return {**status, "running": False}
    return reconstruct(paths, status, why)
