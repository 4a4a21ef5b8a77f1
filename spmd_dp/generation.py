"""The generation loop of one rank: claim batches, keep the engine full, hand finished batches to the output.

The loop keeps enough claimed batches in flight that the engine always has more
than its `capacity` (vLLM's max_num_seqs) requests queued: a new batch is
claimed as soon as the queue falls below capacity + batch_size (less in the run's
tail, and while other ranks' engines start: `Claims.target`, spmd_dp/control/claims.py),
unless the requests queued already need more tokens (prompt + max_tokens) than the
engine's KV cache holds: more would only wait in this rank's queue while another
rank runs dry, which under dynamic scheduling is work better left unclaimed. A batch is done
when its last request finishes; its rows (shaped by spmd_dp/output/rows.py) go to the rank's sink
(spmd_dp/output/sink.py), which puts them in the outbox for the control thread to stream to rank 0. What
the loop knows of the other ranks it reads from its `Peers` (spmd_dp/control/peers.py).

Faults (the engine is a `SupervisedEngine`, spmd_dp/engines/supervisor.py): when the
engine dies, the loop has it restarted and re-adds the requests of its unfinished
batches. When the engine stalls (no step within `batch_timeout`, or a batch older than
that), the loop first hands its batches back to the other ranks, then has the engine
restarted. When the engine cannot be restarted, the loop hands its batches back and
the rank takes no more work. A rank with nothing to do waits until rank 0 has
committed every batch, taking any batch another rank hands back. A drain (SIGTERM,
spmd_dp/control/drain.py) stops the claims and lets the batches in flight finish until
`drain_timeout`. A request the engine failed (not bad input, and not the engine's own
death) is added again, up to its `max_retries`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from spmd_dp.control.claims import Batch, Claims
from spmd_dp.config import RunConfig
from spmd_dp.engines.base import FAILED, REJECTED, Completion, Engine, EngineFailure, EngineGaveUp, Request
from spmd_dp.errors import RunFailure
from spmd_dp.inputs import InputIndex
from spmd_dp.inputs.order import RecordOrder
from spmd_dp.log import logger
from spmd_dp.control.messages import (DRAINING, GAVE_UP, GENERATING, HANDED_BACK, READY, RESTARTING, BatchDone,
                                      RankState, RankStats)
from spmd_dp.control.outbox import Outbox
from spmd_dp.control.peers import Peers
from spmd_dp.output.rows import BAD_RECORD, RowShaper
from spmd_dp.output.sink import Sink
from spmd_dp.prompting.options import sampling_kwargs
from spmd_dp.prompting.prompts import PromptBuilder, PromptError

TICK_S = 0.2  # how long the loop waits when it has nothing to run but more may come
IDLE_ROUNDS = 3  # reads of the board with every rank idle after which nothing more can come


@dataclass
class _InFlight:
    batch: Batch
    records: List[Optional[Dict[str, Any]]]  # None: a bad record, skipped
    claimed_at: float
    since: float  # when its requests went into the current engine (batch_timeout runs from here)
    claimed_unix: float = 0.0  # the claim's wall clock (the timeline)
    done: List[Optional[Completion]] = field(default_factory=list)
    remaining: int = 0
    demands: List[int] = field(default_factory=list)  # KV tokens each request may need (0: not in the engine)
    requests: List[Optional[Request]] = field(default_factory=list)  # kept for a retry
    tries: List[int] = field(default_factory=list)


def token_demand(request: Request) -> int:
    """KV tokens a request may need: its prompt (token ids, or ~4 characters a token) plus its outputs."""
    prompt = request.prompt
    if isinstance(prompt, list):
        n = len(prompt)
    else:
        text = prompt if isinstance(prompt, str) else str(getattr(prompt, "messages", prompt))
        n = len(text) // 4 + 1
    if request.task != "generate":
        return n
    return n + int(request.sampling.get("max_tokens") or 16) * int(request.sampling.get("n") or 1)


class GenerationLoop:
    def __init__(self, cfg: RunConfig, engine: Engine, claims: Claims, index: InputIndex, prompts: PromptBuilder,
                 outbox: Outbox, peers: Peers, sink: Sink, rank: int, stats: RankStats, n_batches: int,
                 order: Optional[RecordOrder] = None) -> None:
        """n_batches: batches of this run (all committed: the end); order: which records a batch's slots hold
        (spmd_dp/inputs/order.py; None: input order)."""
        self.cfg, self.engine, self.claims, self.index, self.outbox, self.rank = cfg, engine, claims, index, outbox, rank
        self.order = order if order is not None else RecordOrder(index.n_records)
        self.peers, self.sink, self.shaper = peers, sink, RowShaper(cfg, rank)
        self.prompts = prompts
        self.stats = stats
        self.n_batches = n_batches
        self.drain = peers.drain
        self.sampling = sampling_kwargs(cfg, rank)
        self.inflight: Dict[int, _InFlight] = {}
        self.queued = 0  # requests in the engine, not finished
        self.demand = 0  # KV tokens they may need
        self.next_claim = 0.0  # after a claim found nothing, the next try waits a tick
        self.idle_from: Optional[int] = None  # the control round from which every rank was idle
        self.last_emit: Optional[float] = None
        self.drained = 0  # batches finished during a drain
        self.won = 0  # claims that found a batch

    def _has_room(self) -> bool:
        """Room for another batch: fewer requests queued than the claims' target (an engine-full and a batch, less
        in the run's tail and while other engines start: spmd_dp/control/claims.py), counted in requests, not batches (a
        batch waiting for its longest request must not stop new claims), and the KV cache not spoken for."""
        kv = self.engine.kv_tokens
        target = self.claims.target(self.engine.capacity, self.cfg.batch_size, self.peers.reported())
        return self.queued < target and (kv is None or self.demand < kv or self.queued == 0)

    def _fill(self) -> None:
        """Claim batches while the engine has room (returned work first, spmd_dp/control/claims.py)."""
        now = time.monotonic()
        if now < self.next_claim:
            return
        while self._has_room():
            self.outbox.idle = False  # said before the claim: no peer may see this rank idle while it claims
            if not self._claim():
                self.next_claim = now + TICK_S
                break
        self.outbox.idle = not self.inflight

    def _claim(self) -> bool:
        t0 = time.perf_counter()
        view = self.peers.view
        batch = self.claims.next(view.out, view.returned if self.peers.shared else None)
        self.stats.claims += 1
        self.stats.claim_s += time.perf_counter() - t0
        if batch is None:
            return False
        records = self.order.read(self.index, batch.start, batch.stop)
        now, n = time.monotonic(), len(records)
        if not self.won:
            self.outbox.event(GENERATING)
        self.won += 1
        job = _InFlight(batch, records, now, now, round(time.time(), 3), [None] * n, n, [0] * n, [None] * n, [0] * n)
        self.inflight[batch.index] = job
        settled = [c for i, record in enumerate(records) if (c := self._submit(job, i, record)) is not None]
        for c in settled:  # skipped bad records and requests the engine refused
            self._finish_request(c)
        return True

    def _submit(self, job: _InFlight, i: int, record: Optional[Dict[str, Any]]) -> Optional[Completion]:
        """Add one record's request to the engine; a Completion when it is settled at once (skipped, refused)."""
        if record is None:
            return Completion(f"{job.batch.index}:{i}", error=BAD_RECORD)
        try:  # reads the record's images, here: an image gone or unreadable since the scan is this record's fault
            request = job.requests[i] = self.prompts.request(f"{job.batch.index}:{i}", record, self.sampling)
        except PromptError as e:
            return Completion(f"{job.batch.index}:{i}", error=str(e))
        rejected = self.engine.add(request)
        if rejected is not None:
            return rejected
        self.queued += 1
        job.demands[i] = token_demand(request)
        self.demand += job.demands[i]
        return None

    def _retry(self, job: _InFlight, i: int, c: Completion) -> bool:
        """Add a request the engine failed again, if it has tries left; True if it did."""
        request = job.requests[i]
        if c.error_kind != FAILED or request is None or job.tries[i] >= request.max_retries:
            return False
        job.tries[i] += 1
        logger.warning("record %s=%r: %s; trying again (%d of max_retries=%d)", self.cfg.primary_key, request.key,
                       c.error, job.tries[i], request.max_retries)
        rejected = self.engine.add(request)
        if rejected is not None:
            self._finish_request(rejected)
        else:
            self.queued += 1
        return True

    def _finish_request(self, c: Completion) -> None:
        batch_index, i = (int(x) for x in c.request_id.split(":"))
        job = self.inflight.get(batch_index)
        if job is None or job.done[i] is not None:
            return  # of a batch handed back, or finished already: not this rank's to report
        if c.error is not None and self._retry(job, i, c):
            return
        if (c.error is not None and c.error != BAD_RECORD and c.error_kind in (REJECTED, FAILED)
                and self.cfg.on_bad_record == "fail" and not self.prompts.openai):
            rec = job.records[i]
            what = "was rejected by the engine" if c.error_kind == REJECTED else \
                f"failed in the engine ({job.tries[i] + 1} tries: max_retries={job.requests[i].max_retries})"
            raise RunFailure(f"record {self.cfg.primary_key}={rec[self.cfg.primary_key]!r} (batch {batch_index}, "
                             f"record {self.order.positions(job.batch.start + i, job.batch.start + i + 1)[0]}) "
                             f"{what}: {c.error}; set on_bad_record=skip to send such records to the errors file")
        job.done[i] = c
        if c.cached_tokens is not None:
            self.stats.prefix_cache_hits += c.cached_tokens
            self.stats.prefix_cache_queries += c.prompt_tokens
        job.remaining -= 1
        self.demand -= job.demands[i]
        if job.remaining == 0:
            self._emit(self.inflight.pop(batch_index))

    def _emit(self, job: _InFlight) -> None:
        b = job.batch
        shaped = self.shaper.shape(b.index, self.order.positions(b.start, b.stop), job.records, job.done, job.tries)
        if self.order.permuted:  # the rows in input order, with their positions (the output is put in order by them)
            shaped.in_input_order()
        self.sink.put(BatchDone(b.index, b.start, b.stop, self.rank, [], shaped.errors, shaped.prompt_tokens,
                                shaped.output_tokens, round(time.monotonic() - job.claimed_at, 3),
                                positions=shaped.positions if self.order.permuted else None,
                                claimed_unix=job.claimed_unix), shaped.rows)
        self.last_emit = time.monotonic()
        self.drained += self.drain.requested
        s = self.stats
        s.records += len(shaped.rows)
        s.batches += 1
        s.prompt_tokens += shaped.prompt_tokens
        s.output_tokens += shaped.output_tokens

    def late(self) -> Optional[str]:
        """The oldest batch, if it has been in the engine longer than batch_timeout (the engine stalled)."""
        job = next(iter(self.inflight.values()), None)  # in claim order (a restart resets every batch's clock)
        if job is not None and time.monotonic() - job.since > self.cfg.batch_timeout:
            b = job.batch
            return (f"batch {b.index} (records {b.start}..{b.stop - 1}) on rank {self.rank} exceeded "
                    f"batch_timeout={self.cfg.batch_timeout}s")
        return None

    def _step(self) -> None:
        late = self.late()
        if late is not None:
            raise EngineFailure(late, stalled=True)
        for c in self.engine.step():
            self.queued -= 1
            self._finish_request(c)

    def _recover(self, failure: EngineFailure) -> bool:
        """After an engine fault: True when a new engine runs (with this rank's batches re-added), False when
        the rank gave up (its batches handed back)."""
        if failure.stalled:  # batch_timeout has passed already: the others need not wait for a restart
            self._hand_back(f"its engine stalled: {failure.cause}")
        self.outbox.heartbeat = None  # an engine start may take minutes: the control thread does not count it
        self.outbox.event(RESTARTING, detail=failure.cause)
        t0 = time.monotonic()
        try:
            self.engine.restart(failure)
        except EngineGaveUp as e:
            self._hand_back(str(e))
            self.stats.engine_failed, self.stats.failed_at_unix = str(e), round(time.time(), 3)
            self.outbox.state = RankState.GAVE_UP
            self.outbox.event(GAVE_UP, detail=str(e))
            return False
        finally:
            self.stats.engine_restarts = self.engine.restarts
            self.stats.engine_faults = list(self.engine.faults)
        self.outbox.event(READY, detail="restarted", value=round(time.monotonic() - t0, 3))
        self._readd()
        return True

    def _hand_back(self, why: str) -> None:
        """Give every claimed, unfinished batch back: the other ranks take them before new work."""
        jobs = list(self.inflight.values())
        given = self.claims.give_back([job.batch for job in jobs])  # and the rest of its run
        self.inflight.clear()
        self.queued = self.demand = 0
        if not given:
            return
        self.stats.handed_back += len(given)
        self.outbox.event(HANDED_BACK, detail=why, value=len(given),
                          batches=[[job.batch.index, job.claimed_unix] for job in jobs])
        logger.warning("rank %d handed back %d batches (%s; %d records) to the other ranks: %s", self.rank,
                       len(given), ", ".join(str(b.index) for b in given), sum(b.size for b in given), why)

    def _readd(self) -> None:
        """Put the unfinished requests of this rank's batches into the new engine (none was committed)."""
        self.queued = self.demand = 0
        now, added, settled = time.monotonic(), 0, []
        for job in list(self.inflight.values()):
            job.since = now
            for i, record in enumerate(job.records):
                if job.done[i] is None:
                    job.demands[i] = 0
                    c = self._submit(job, i, record)
                    added += c is None
                    if c is not None:
                        settled.append(c)
        for c in settled:
            self._finish_request(c)
        if self.inflight:
            logger.info("rank %d re-added %d requests of %d unfinished batches to the new engine", self.rank, added,
                        len(self.inflight))

    def _nothing_left(self) -> bool:
        """Idle: leave once rank 0 has committed every batch, or when every rank has been idle (or out) for
        IDLE_ROUNDS reads of the board: then no batch is held anywhere, and none can be handed back."""
        peers = self.peers
        if peers.view.committed >= self.n_batches:
            return True
        if not peers.everyone_idle():
            self.idle_from = None
            return False
        if self.idle_from is None:
            self.idle_from = peers.view.reads
        return peers.view.reads - self.idle_from >= IDLE_ROUNDS

    def run(self) -> RankStats:
        box = self.outbox
        start = time.monotonic()
        self.stats.gen_start_unix = time.time()
        cut = f"within drain_timeout={self.drain.timeout_s:g}s"
        said_drain = False
        while True:
            self.peers.check()
            self.sink.check()
            box.beat()
            try:
                if not self.drain.requested:
                    self._fill()
                else:
                    if not said_drain:
                        said_drain = True
                        box.event(DRAINING, detail=self.drain.why or "")
                    if not self.inflight or self.drain.expired():
                        break
                if not self.inflight:
                    if self._nothing_left():
                        break
                    time.sleep(TICK_S)
                    continue
                self._step()
            except EngineFailure as failure:
                if self.drain.requested:  # vLLM's engine got the signal too and stopped: no restart in a drain
                    logger.info("rank %d: the engine stopped during the drain (%s)", self.rank, failure.cause)
                    cut = "before the engine stopped"
                    break
                if not self._recover(failure):
                    break
        self.sink.close()  # every finished batch is in the outbox
        box.idle = True
        if self.drain.requested:
            left = sum(j.batch.size for j in self.inflight.values())
            logger.info("rank %d drained: %d batches in flight finished and went to rank 0%s", self.rank,
                        self.drained, f"; {len(self.inflight)} batches ({left} records) did not finish {cut}: a "
                        f"rerun does them" if self.inflight else "")
        if self.last_emit is not None:
            self.stats.busy_s = round(self.last_emit - start, 3)
            self.stats.gen_end_unix = round(self.stats.gen_start_unix + self.stats.busy_s, 3)
        return self.stats
