"""Rank 0's role in a workflow node: open the journal on the scanned input, commit what arrives, report.

`open_node` is every rank's setup of a node: the input scan that all ranks share
(spmd_dp/inputs/scan.py: each validates and indexes a share, the shares merge into the
index every rank reads batches through), then rank 0's `Rank0.open`, which opens the
journal (resume or refuse) and writes the resolved config; what it returns (`WorkOrder`)
is broadcast to every rank. Only rank 0 makes a `Rank0` (spmd_dp/run.py). While the ranks
generate, the control thread hands it every rank's messages (`handle`): finished
batches are committed at once, rank statistics kept for the metrics. `finish()`
checks that every record is committed, writes the final file in input order, the
errors file and the metrics, and prints the summary table.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from spmd_dp.batches import Span
from spmd_dp.config import RunConfig, to_yaml
from spmd_dp.drain import Drain
from spmd_dp.errors import Drained, RunFailure, UsageError
from spmd_dp.inputs import BadRecord, InputIndex, RecordSpec, ScanResult, locations, shared_scan
from spmd_dp.inputs.workers import Scanners, scan_processes
from spmd_dp.journal import Journal, fingerprint
from spmd_dp.log import logger
from spmd_dp.messages import BatchDone, Message, RankStats
from spmd_dp.metrics import Metrics
from spmd_dp.output import assemble, atomic_write, float32_columns, write_errors
from spmd_dp.plan import OutputPaths
from spmd_dp.progress import Progress
from spmd_dp.prompts import PromptBuilder
from spmd_dp.shards import finish_shards, mark_shared, shared_seen


@dataclass
class WorkOrder:
    """What rank 0 tells every rank before the work starts (broadcast as JSON)."""

    pending: List[Span] = field(default_factory=list)  # record spans not committed yet
    complete: bool = False  # the journal says the output is written already
    error: Optional[str] = None  # a UsageError's line: every rank exits 2
    shared: Optional[str] = None  # output_mode=sharded: the marker rank 0 left in the parts' folder (shards.py)


def record_spec(cfg: RunConfig, prompts: PromptBuilder) -> RecordSpec:
    """What a valid record is for this node; a table without the prompt's column is refused up front (unless a
    template decides what the prompt reads)."""
    columns = None if prompts.template is not None else (cfg.prompt_field, cfg.messages_field)
    return RecordSpec(cfg.primary_key, prompts.check, columns)


def fork_scanners(cfg: RunConfig, prompts: PromptBuilder, device_kind: str, local_world_size: int) -> Scanners:
    """The processes that will scan this rank's share of the input, forked now: before the engine starts."""
    kind = "cpu_engine" if device_kind == "cpu" and cfg.inference_engine != "echo" else device_kind
    return Scanners(record_spec(cfg, prompts), cfg.batch_size, cfg.storage_options or None,
                    scan_processes(kind, local_world_size))


def open_node(cfg: RunConfig, prompts: PromptBuilder, group, rank0: Optional["Rank0"], scanners: Optional[Scanners]
              ) -> Tuple[Optional[InputIndex], "WorkOrder"]:
    """Every rank: scan a share of the input (merged over `group`, a spmd_dp.comm.Group) in its scanners, then
    rank 0 opens the journal; the WorkOrder is rank 0's, on every rank. A bad input is the same one-line error on
    every rank."""
    try:
        result = shared_scan(locations(cfg.data_dir, cfg.input_data_path), cfg.input_format, record_spec(cfg, prompts),
                             cfg.batch_size, cfg.on_bad_record == "skip", group, cfg.storage_options or None,
                             scanners)
    except UsageError as e:
        return None, WorkOrder(error=str(e))
    order = WorkOrder(**group.broadcast_json(asdict(rank0.open(result)) if rank0 else None))
    if order.shared is not None:  # output_mode=sharded: every rank writes into the folder rank 0 made
        seen = group.all_gather_bytes(b"1" if shared_seen(OutputPaths.of(cfg).parts, order.shared) else b"0")
        blind = [r for r, x in enumerate(seen) if x != b"1"]
        if blind:
            order.error = (f"output error: output_mode=sharded: ranks {blind} do not see {OutputPaths.of(cfg).parts}, "
                           f"where rank 0 writes: output_dir must be on a filesystem every rank shares (or use "
                           f"output_mode=single: rank 0 writes everything)")
    return result.index, order


class Rank0:
    def __init__(self, cfg: RunConfig, paths: OutputPaths, prompts: PromptBuilder, world: int) -> None:
        self.cfg, self.paths, self.prompts = cfg, paths, prompts
        self.journal = Journal(paths, {})
        self.metrics = Metrics(world)
        self.bad: List[BadRecord] = []
        self.n_records = 0
        self.progress: Optional[Progress] = None
        self.failed: Dict[int, RankStats] = {}  # ranks whose engine failed at start or mid-run
        self.todo = 0  # records to generate in this run

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
            self.journal.fingerprint = fingerprint(cfg, index.content_sha256(), index.n_records,
                                                   self.prompts.template_path)
            self.journal.open(overwrite=cfg.overwrite)
            atomic_write(paths.config, [to_yaml(cfg).encode()])
        except UsageError as e:
            return WorkOrder(error=str(e))
        except OSError as e:
            return WorkOrder(error=f"output error: {e.strerror}: {e.filename}; check that output_dir="
                                   f"{cfg.output_dir!r} is a writable directory")
        if self.journal.complete:
            logger.info("%s is complete already (journal %s); nothing to do", paths.output, paths.journal)
            return WorkOrder([], True)
        pending = self.journal.missing(index.n_records)
        todo = sum(b - a for a, b in pending)
        if todo < index.n_records:
            logger.info("resuming: %d of %d records committed already, %d to go", index.n_records - todo,
                        index.n_records, todo)
        self.progress = Progress(todo)
        self.todo = todo
        return WorkOrder(pending, shared=mark_shared(paths.parts) if cfg.output_mode == "sharded" else None)

    def handle(self, messages: List[Message]) -> int:
        """Called by the control thread with the messages of a round, from every rank (one journal line for all);
        returns how many batches were committed (a batch that came twice counts once)."""
        batches = [m for m in messages if isinstance(m, BatchDone)]
        committed = self.journal.commit(batches) if batches else 0
        for m in messages:
            if isinstance(m, BatchDone):
                logger.info("Received results for batch %d from rank %d (%d records)", m.index, m.rank, m.records)
                self.progress.update(m.stop - m.start, m.output_tokens)
            elif isinstance(m, RankStats):
                self.metrics.add_rank(m)
                if m.engine_failed:
                    self.failed[m.rank] = m
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
            raise Drained(f"stopped by {drain.why} after draining: {self.n_records - left} of {self.n_records} "
                          f"records committed ({self.todo - left} in this run), {left} to go; rerun with the same "
                          f"output_dir to resume", drain.signum)
        if missing:
            raise RunFailure(f"{sum(b - a for a, b in missing)} records were not generated (first span "
                             f"{missing[0][0]}..{missing[0][1] - 1}); rerun with the same output_dir to resume")
        t0 = time.monotonic()
        if self.paths.shards is not None:  # output_mode=sharded: the ranks' parts become the shards, in place
            _, size = finish_shards(self.journal, self.cfg.output_format)
        else:
            size = assemble(self.journal, self.n_records, float32_columns(self.cfg.name))
        merge_s = time.monotonic() - t0
        skipped = None
        if self.cfg.on_bad_record == "skip" or self.journal.errors:  # (on_long_prompt=skip: whatever on_bad_record)
            skipped = write_errors(self.paths.errors, [b.to_json() for b in self.bad] + self.journal.errors)
            if skipped:
                logger.warning("%d records skipped: see %s", skipped, self.paths.errors)
        self._report(final=True, merge_s=round(merge_s, 3), output_bytes=size, skipped_records=skipped,
                     merge_mb_per_s=round(size / 1e6 / merge_s, 1) if merge_s > 0 else None)

    def _report(self, final: bool, **total: Any) -> None:
        """metrics.json and the summary table (also after a drain: what this run did)."""
        report = self.metrics.report()
        report.total.update(complete=final, **total)
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
