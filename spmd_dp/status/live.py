"""Rank 0's live status of a run: `${name}.status.json`, rewritten atomically every STATUS_EVERY_S by a thread of
its own, the same figures for Prometheus (spmd_dp/status/prometheus.py), and `${name}.events.jsonl`.

Rank 0 hears everything it needs from the messages it gets anyway (spmd_dp/control/messages.py): finished
batches (records, tokens, rank), each rank's events (engine ready or failed, restarting, gave up, handed back,
draining: a handful a run) and heartbeats (one every few seconds a rank, most riding with its batches), and
its last message (done). `note` takes each round of them (on the control thread); `snapshot` is the status
as a dict (docs/observability.md lists its fields). The one thing a reader would get wrong: a rank's "last
heartbeat" is when rank 0 last heard from it, not a clock on that rank.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple

from spmd_dp.config.schema import SUMMARY_KEYS
from spmd_dp.control.messages import (BEAT, DRAINING, FAILED_START, GAVE_UP, GENERATING, HANDED_BACK, READY,
                                      RESTARTING, BatchDone, Message, RankEvent, RankStats)
from spmd_dp.log import logger
from spmd_dp.output.files import atomic_write
from spmd_dp.redact import scrub

STATUS_VERSION = 1
STATUS_EVERY_S = 2.0  # how often rank 0 rewrites the status file
WINDOW_S = 60.0  # the "last minute" of tokens/s and of the ETA
MAX_ERRORS = 50
PHASES = ("starting", "generating", "draining", "done", "drained", "failed")
TERMINAL = ("done", "drained", "failed")
# a rank's state: starting, ready, generating, restarting, gave up, failed (its engine did not start), draining, and
# at its end done (or drained)
STATES = ("starting", "ready", "generating", "restarting", "gave up", "failed", "draining", "drained", "done")


@dataclass
class RankRow:
    rank: int
    host: str = ""
    state: str = "starting"
    engine_restarts: int = 0
    batches: int = 0
    records: int = 0
    output_tokens: int = 0
    engine_start_s: Optional[float] = None
    last_heartbeat_unix: Optional[float] = None
    loop_age_s: Optional[float] = None  # from its last heartbeat: seconds since its generation loop went round


@dataclass
class RunFigures:
    """What a run's status says, whoever computes it (rank 0 live, or history.py from the files of a dead run)."""

    total: int
    before: int = 0  # records committed by earlier runs (a resume)
    done: int = 0  # records committed, all runs
    output_tokens: int = 0  # this run's
    window: Deque[Tuple[float, int, int]] = field(default_factory=deque)  # (unix, records, tokens) of commits


class LiveStatus:
    def __init__(self, paths, cfg, world: int, total: int, todo: int, bad_records: int = 0) -> None:
        """paths: the node's OutputPaths; total: the input's records; todo: those this run generates."""
        self.paths, self.world = paths, world
        self.lock = threading.Lock()
        self.started = time.time()
        self.figures = RunFigures(total, before=total - todo, done=total - todo)
        self.ranks = [RankRow(r) for r in range(world)]
        self.phase, self.reason = "starting", ""
        self.errors: List[str] = []
        self.bad_records = bad_records
        self.config = {k: v for k, v in scrub(cfg).items() if k in SUMMARY_KEYS}
        self.config["max_tokens"] = cfg.generation_options.max_tokens
        self.port: Optional[int] = None  # the Prometheus server's, once it listens
        self._events = open(paths.events, "a")
        self._event({"event": "run", "t": round(self.started, 3), "world": world, "records": total, "todo": todo,
                     "pid": os.getpid(), "host": socket.gethostname()})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write_loop, name="spmd_dp-status", daemon=True)

    def start(self) -> "LiveStatus":
        self.write()
        self._thread.start()
        return self

    # -- what rank 0 hears (the control thread) ---------------------------------------------------------------
    def note(self, messages: List[Message], fresh: List[BatchDone]) -> None:
        """A round of messages; `fresh`: their batches that were not committed before (a batch sent twice counts once)."""
        now = time.time()
        with self.lock:
            f = self.figures
            for b in fresh:
                f.done += b.stop - b.start
                f.output_tokens += b.output_tokens
                f.window.append((now, b.stop - b.start, b.output_tokens))
            while f.window and f.window[0][0] < now - WINDOW_S:
                f.window.popleft()
            for m in messages:
                row = self.ranks[m.rank]
                row.last_heartbeat_unix = now
                if isinstance(m, BatchDone):
                    row.batches += 1
                    row.records += m.records
                    row.output_tokens += m.output_tokens
                    if row.state in ("starting", "ready"):
                        row.state = "generating"
                    if self.phase == "starting":
                        self.phase = "generating"
                elif isinstance(m, RankStats):
                    row.engine_restarts = m.engine_restarts
                    if row.state not in ("gave up", "failed"):
                        row.state = "drained" if row.state == "draining" else "done"
                elif isinstance(m, RankEvent):
                    self._on_event(row, m)

    def _on_event(self, row: RankRow, e: RankEvent) -> None:
        if e.host:
            row.host = e.host
        if e.kind == BEAT:
            row.loop_age_s = e.value if e.value >= 0 else None
            return
        self._event({"event": e.kind, "t": e.unix, "rank": e.rank, "detail": e.detail, "value": e.value,
                     **({"batches": e.batches} if e.batches else {})})
        if e.kind == READY:
            if e.detail == "restarted":
                row.state = "generating"
            else:
                row.state, row.engine_start_s = "ready", e.value
        elif e.kind == FAILED_START:
            row.state = "failed"
            self._error(f"rank {e.rank}: its engine did not start: {e.detail}")
        elif e.kind == GENERATING:
            row.state = "generating"
            if self.phase == "starting":
                self.phase = "generating"
        elif e.kind == RESTARTING:
            row.state = "restarting"
            row.engine_restarts += 1
            self._error(f"rank {e.rank}: engine fault, restarting it: {e.detail}")
        elif e.kind == GAVE_UP:
            row.state = "gave up"
            self._error(f"rank {e.rank}: gave up its engine: {e.detail}")
        elif e.kind == HANDED_BACK:
            self._error(f"rank {e.rank}: handed back {int(e.value)} batches: {e.detail}")
        elif e.kind == DRAINING:
            if row.state not in ("gave up", "failed", "done"):
                row.state = "draining"
            if self.phase not in TERMINAL:
                self.phase, self.reason = "draining", e.detail

    def _error(self, line: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(line)

    def _event(self, line: Dict[str, Any]) -> None:
        try:
            self._events.write(json.dumps(line) + "\n")
            self._events.flush()
        except (OSError, ValueError) as e:  # an observer's file: never the run's failure
            logger.debug("could not write %s: %s", self.paths.events, e)

    # -- the end ------------------------------------------------------------------------------------------------
    def end(self, phase: str, reason: str = "") -> None:
        """done | drained | failed: the last status (written at once)."""
        with self.lock:
            if self.phase in TERMINAL:
                return
            self.phase, self.reason = phase, reason
            self._event({"event": phase, "t": round(time.time(), 3), "detail": reason})
        self.write()

    def close(self) -> None:
        """Stop the writer; a run that ends without saying how (an exception elsewhere) failed."""
        if self.phase not in TERMINAL:
            self.end("failed", "the run stopped")
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._events.close()

    # -- the status -----------------------------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, Any]:
        now = time.time()
        with self.lock:
            f = self.figures
            ranks = [dict(vars(r)) for r in self.ranks]
            phase, reason, errors = self.phase, self.reason, list(self.errors)
            window = list(f.window)
            done, tokens = f.done, f.output_tokens
        elapsed = now - self.started
        span = min(WINDOW_S, elapsed)
        recent_tokens = sum(t for _, _, t in window)
        recent_records = sum(r for _, r, _ in window)
        rate = recent_records / span if span > 0 and window else 0.0
        overall = (done - f.before) / elapsed if elapsed > 0 else 0.0
        left = f.total - done
        per_s = rate or overall
        return {
            "spmd_dp_status": STATUS_VERSION, "name": self.paths.name, "output_dir": str(self.paths.dir),
            "phase": phase, "reason": reason, "running": phase not in TERMINAL,
            "pid": os.getpid(), "host": socket.gethostname(), "started_unix": round(self.started, 3),
            "updated_unix": round(now, 3), "elapsed_s": round(elapsed, 1), "status_every_s": STATUS_EVERY_S,
            "world_size": self.world, "hosts": sorted({r["host"] for r in ranks if r["host"]}),
            "records": {"done": done, "total": f.total, "before": f.before, "this_run": done - f.before,
                        "left": left, "bad": self.bad_records},
            "output_tokens": tokens,
            "tokens_per_s": {"last_minute": round(recent_tokens / span, 1) if span > 0 and window else 0.0,
                             "overall": round(tokens / elapsed, 1) if elapsed > 0 else 0.0},
            "records_per_s": {"last_minute": round(rate, 2), "overall": round(overall, 2)},
            "eta_s": round(left / per_s, 1) if per_s > 0 else (0.0 if left == 0 else None),
            "ranks": [{**r, "heartbeat_age_s": round(now - r["last_heartbeat_unix"], 1)
                       if r["last_heartbeat_unix"] else None} for r in ranks],
            "errors": errors, "metrics_port": self.port, "config": self.config,
        }

    def write(self) -> None:
        try:
            atomic_write(self.paths.status, [json.dumps(self.snapshot(), indent=1).encode() + b"\n"])
        except OSError as e:  # a full disk shows in the run's own files first; the status is not worth failing for
            logger.debug("could not write %s: %s", self.paths.status, e)

    def _write_loop(self) -> None:
        while not self._stop.wait(STATUS_EVERY_S):
            self.write()
