"""Rank 0's role in a workflow node: open the journal on the scanned input, commit what arrives, report.

Only rank 0 makes a `Rank0` (spmd_dp/run.py). `open` opens the journal (resume, or refuse another run's
output), writes the resolved config and says what is left to do (the `WorkOrder` every rank gets:
spmd_dp/node.py). While the ranks generate, the control thread hands it every rank's messages
(`handle`): finished batches are committed at once (one journal line for all), rank statistics kept for the
metrics. `finish()` checks that every record is committed, has the output written in input order
(`Output.finish`), writes the errors file and the metrics, and prints the summary table.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Dict, List, Optional

from spmd_dp.config import to_yaml
from spmd_dp.control.drain import Drain
from spmd_dp.control.messages import BatchDone, Message, RankStats
from spmd_dp.errors import Drained, RunFailure, UsageError
from spmd_dp.inputs import BadRecord, ScanResult
from spmd_dp.log import logger
from spmd_dp.node import Node, WorkOrder
from spmd_dp.output.files import atomic_write
from spmd_dp.output.final import write_errors
from spmd_dp.output.journal import fingerprint, said_complete
from spmd_dp.status.live import LiveStatus
from spmd_dp.status.metrics import Metrics
from spmd_dp.status.progress import Progress


class Rank0:
    def __init__(self, node: Node) -> None:
        self.node, self.cfg, self.prompts, self.output = node, node.cfg, node.prompts, node.output
        self.paths = node.output.paths
        self.journal = node.output.journal({})
        self.metrics = Metrics(node.plan.world_size)
        self.bad: List[BadRecord] = []
        self.n_records = 0
        self.progress: Optional[Progress] = None
        self.failed: Dict[int, RankStats] = {}  # ranks whose engine failed at start or mid-run
        self.todo = 0  # records to generate in this run
        self.order = None  # the record order (spmd_dp/inputs/order.py): its stats go to the metrics
        self.live: Optional[LiveStatus] = None  # ${name}.status.json, the events, the Prometheus metrics
        self.server = None

    def complete_already(self) -> bool:
        """Before any engine starts: does the journal say this node's output is written (overwrite=true: no)? Then
        no engine starts; the journal is still checked against the scanned input in `open` (another run's: exit 2)."""
        return not self.cfg.overwrite and said_complete(self.paths)

    def open(self, scanned: ScanResult) -> WorkOrder:
        """Open the journal on the scanned input, say what is left to do (or why not)."""
        cfg, paths = self.cfg, self.paths
        index = scanned.index
        logger.info("prompts from %s", self.prompts.describe())
        try:
            self.bad = scanned.bad
            if self.bad:
                logger.warning("%d bad records in the input (first: %s: %s); on_bad_record=skip: they go to %s",
                               len(self.bad), self.bad[0].where, self.bad[0].reason, paths.errors)
            self.n_records = index.n_records
            self.order = scanned.order
            self.journal.fingerprint = fingerprint(cfg, index.content_sha256(), index.n_records,
                                                   self.prompts.template_path,
                                                   scanned.order.digest() if scanned.order is not None else None)
            self.journal.open(overwrite=cfg.overwrite)
            if not self.journal.complete:
                atomic_write(paths.config, [to_yaml(cfg).encode()])
        except UsageError as e:
            return WorkOrder(error=str(e))
        except OSError as e:
            return WorkOrder(error=f"output error: {e.strerror}: {e.filename}; check that output_dir="
                                   f"{cfg.output_dir!r} ({paths.dir}) is a writable directory")
        if self.journal.complete:
            logger.info("%s is complete already (journal %s); nothing to do", self.output.path, paths.journal)
            return WorkOrder([], True)
        pending = self.journal.missing(index.n_records)
        todo = sum(b - a for a, b in pending)
        if todo < index.n_records:
            logger.info("resuming: %d of %d records committed already, %d to go", index.n_records - todo,
                        index.n_records, todo)
        self.progress = Progress(todo)
        self.todo = todo
        error = self._watch(index.n_records, todo)
        if error:
            return WorkOrder(error=error)
        return WorkOrder(pending, shared=self.output.share())

    def _watch(self, total: int, todo: int) -> Optional[str]:
        """The live status (spmd_dp/status/live.py), and its Prometheus server on metrics_port; a UsageError's line."""
        self.live = LiveStatus(self.paths, self.cfg, self.node.plan.world_size, total, todo, len(self.bad))
        if self.cfg.metrics_port is not None:
            from spmd_dp.status.prometheus import MetricsServer

            try:
                self.server = MetricsServer(self.cfg.metrics_port, self.live.snapshot)
            except UsageError as e:
                return str(e)
            self.live.port = self.server.port
            logger.info("metrics: http://%s:%d/metrics (Prometheus)", socket.gethostname(), self.server.port)
        self.live.start()
        logger.info("status: %s (python -m spmd_dp.status %s%s)", self.paths.status, self.paths.dir,
                    "" if self.cfg.name == "generate_responses" else f" {self.cfg.name}")
        return None

    def handle(self, messages: List[Message]) -> int:
        """Called by the control thread with the messages of a round, from every rank (one journal line for all);
        returns how many batches were committed (a batch that came twice counts once)."""
        batches = [m for m in messages if isinstance(m, BatchDone)]
        seen = set(self.journal.spans)
        fresh = [b for b in batches if b.start not in seen and not seen.add(b.start)]  # a batch sent twice counts once
        committed = self.journal.commit(batches) if batches else 0
        for m in messages:
            if isinstance(m, BatchDone):
                logger.info("Received results for batch %d from rank %d (%d records)", m.index, m.rank, m.records)
                self.progress.update(m.stop - m.start, m.output_tokens)
            elif isinstance(m, RankStats):
                self.metrics.add_rank(m)
                if m.engine_failed:
                    self.failed[m.rank] = m
        if self.live is not None:
            self.live.note(messages, fresh)
        return committed

    def finish(self, drain: Optional[Drain] = None, control: Optional[Dict[str, Any]] = None) -> None:
        """Every rank is done: write the final file, the errors file and the metrics; print the summary.
        After a drain that left work undone, say what was committed and stop (a rerun resumes).
        control: what rank 0's control plane counted (its messages, handler calls, CPU), for the metrics."""
        self.progress.close()
        self.metrics.control = dict(control or {})
        missing = self.journal.missing(self.n_records)
        if missing and drain is not None and drain.requested:
            left = sum(b - a for a, b in missing)
            self._report(final=False)
            self._end("drained", f"stopped by {drain.why}")
            raise Drained(f"stopped by {drain.why} after draining: {self.n_records - left} of {self.n_records} "
                          f"records committed ({self.todo - left} in this run), {left} to go; rerun with the same "
                          f"output_dir to resume", drain.signum)
        if missing:
            raise RunFailure(f"{sum(b - a for a, b in missing)} records were not generated (first span "
                             f"{missing[0][0]}..{missing[0][1] - 1}); rerun with the same output_dir to resume")
        t0 = time.monotonic()
        size = self.output.finish(self.journal, self.n_records)
        merge_s = time.monotonic() - t0
        skipped = None
        if self.cfg.on_bad_record == "skip" or self.journal.errors:  # (on_long_prompt=skip: whatever on_bad_record)
            skipped = write_errors(self.paths.errors, [b.to_json() for b in self.bad] + self.journal.errors)
            if skipped:
                logger.warning("%d records skipped: see %s", skipped, self.paths.errors)
        self._report(final=True, merge_s=round(merge_s, 3), output_bytes=size, skipped_records=skipped,
                     merge_mb_per_s=round(size / 1e6 / merge_s, 1) if merge_s > 0 else None)
        self._end("done")

    def _end(self, phase: str, reason: str = "") -> None:
        """The last status, and the timeline picture beside the output (spmd_dp/status/timeline.py)."""
        if self.live is None:
            return
        self.live.end(phase, reason)
        from spmd_dp.status.timeline import draw_run

        draw_run(self.paths)

    def stopped(self, error: BaseException) -> None:
        """The run stops on an error (this rank's, or a peer's): the status says so."""
        if self.live is not None:
            text = str(error).strip()
            self.live.end("failed", text.splitlines()[0] if text else type(error).__name__)

    def _report(self, final: bool, **total: Any) -> None:
        """metrics.json and the summary table (also after a drain: what this run did)."""
        report = self.metrics.report()
        report.total.update(complete=final, **total)
        if self.order is not None and self.order.stats.get("keyed"):
            report.total["prefix_order"] = {"grouped": self.order.permuted, **self.order.stats}
        atomic_write(self.paths.metrics, [report.to_json().encode()])
        for line in report.table().splitlines():
            logger.info("%s", line)
        at_start = {r: m for r, m in sorted(self.failed.items()) if m.failed_at_s is None}
        mid_run = {r: m for r, m in sorted(self.failed.items()) if m.failed_at_s is not None}
        if at_start:
            logger.warning("ranks %s could not start their engines (%s); the others did their share", list(at_start),
                           "; ".join(f"rank {r}: {m.engine_failed}" for r, m in at_start.items()))
        if mid_run:
            logger.warning("ranks %s stopped generating mid-run (%s); the others did their work", list(mid_run),
                           "; ".join(f"rank {r} at +{m.failed_at_s:.1f}s: {m.engine_failed} (handed back "
                                     f"{m.handed_back} batches)" for r, m in mid_run.items()))

    def close(self) -> None:
        self.journal.close()
        if self.progress is not None:
            self.progress.close()
        if self.live is not None:
            self.live.close()
        if self.server is not None:
            self.server.close()
