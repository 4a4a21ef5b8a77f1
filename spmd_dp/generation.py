"""The generation loop of one rank: claim batches, keep the engine full, put finished batches in the outbox.

The loop keeps enough claimed batches in flight that the engine always has more
than its `capacity` (vLLM's max_num_seqs) requests queued: a new batch is
claimed as soon as the queue falls below capacity + batch_size, unless the
requests queued already need more tokens (prompt + max_tokens) than the engine's
KV cache holds: more would only wait in this rank's queue while another rank runs
dry, which under dynamic scheduling is work better left unclaimed. A batch is done
when its last request finishes; its output lines go to the outbox, from which the
control thread streams them to rank 0. A batch older than `batch_timeout` fails the rank.
A request the engine failed (not bad input) is added again, up to its `max_retries`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from spmd_dp.batches import Batch, Claims
from spmd_dp.config import RunConfig, sampling_kwargs
from spmd_dp.engines.base import FAILED, REJECTED, Completion, Engine, Request
from spmd_dp.errors import RunFailure
from spmd_dp.inputs import InputIndex, read_batch
from spmd_dp.log import logger
from spmd_dp.messages import BatchDone, RankStats
from spmd_dp.openai_batch import output_line
from spmd_dp.outbox import Outbox
from spmd_dp.output import output_row
from spmd_dp.prompts import PromptBuilder

TICK_S = 0.2  # how long the loop waits when it has nothing to run but more may come


@dataclass
class _InFlight:
    batch: Batch
    records: List[Optional[Dict[str, Any]]]  # None: a bad record, skipped
    claimed_at: float
    done: List[Optional[Completion]] = field(default_factory=list)
    remaining: int = 0
    demands: List[int] = field(default_factory=list)  # KV tokens each request may need (0: not in the engine)
    requests: List[Optional[Request]] = field(default_factory=list)  # kept for a retry
    tries: List[int] = field(default_factory=list)


BAD_RECORD = "skipped: a bad input record"


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


def record_seed(seed: int, key: Any) -> int:
    """A per-record sampling seed that depends only on the run's seed and the record's key."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class GenerationLoop:
    def __init__(self, cfg: RunConfig, engine: Engine, claims: Claims, index: InputIndex, prompts: PromptBuilder,
                 outbox: Outbox, rank: int, stats: RankStats, fair_share: int) -> None:
        """fair_share: records of this run / ranks."""
        self.cfg, self.engine, self.claims, self.index, self.outbox, self.rank = cfg, engine, claims, index, outbox, rank
        self.prompts = prompts
        self.stats = stats
        self.sampling = sampling_kwargs(cfg, rank)
        self.seed = self.sampling.pop("seed", None)
        self.inflight: Dict[int, _InFlight] = {}
        self.queued = 0  # requests in the engine, not finished
        self.demand = 0  # KV tokens they may need
        # Keep more requests queued than the engine runs at once, but never more than a fair share of
        # the run ahead (a small dataset would otherwise go to the first rank up). Counted in requests,
        # not batches: a batch waiting for its longest request must not stop new claims.
        self.target = min(engine.capacity + cfg.batch_size, max(fair_share, 1))

    def _has_room(self) -> bool:
        kv = self.engine.kv_tokens
        return self.queued < self.target and (kv is None or self.demand < kv or self.queued == 0)

    def _request(self, batch: Batch, i: int, record: Dict[str, Any]) -> Request:
        request = self.prompts.request(f"{batch.index}:{i}", record, self.sampling)
        seed = request.sampling.pop("seed", self.seed)
        if seed is not None and request.task == "generate":
            request.sampling["seed"] = record_seed(seed, record[self.cfg.primary_key])
        return request

    def _claim(self) -> bool:
        batch = self.claims.next(self.outbox.peer_states)
        if batch is None:
            return False
        records = read_batch(self.index, batch.start, batch.stop)
        n = len(records)
        job = _InFlight(batch, records, time.monotonic(), [None] * n, n, [0] * n, [None] * n, [0] * n)
        self.inflight[batch.index] = job
        settled = []  # skipped bad records and requests the engine refused
        for i, record in enumerate(records):
            if record is None:
                settled.append(Completion(f"{batch.index}:{i}", error=BAD_RECORD))
                continue
            request = job.requests[i] = self._request(batch, i, record)
            rejected = self.engine.add(request)
            if rejected is not None:
                settled.append(rejected)
            else:
                self.queued += 1
                job.demands[i] = token_demand(request)
                self.demand += job.demands[i]
        for c in settled:
            self._finish_request(c)
        return True

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
        job = self.inflight[batch_index]
        if c.error is not None and self._retry(job, i, c):
            return
        if (c.error is not None and c.error != BAD_RECORD and c.error_kind in (REJECTED, FAILED)
                and self.cfg.on_bad_record == "fail" and not self.prompts.openai):
            rec = job.records[i]
            what = "was rejected by the engine" if c.error_kind == REJECTED else \
                f"failed in the engine ({job.tries[i] + 1} tries: max_retries={job.requests[i].max_retries})"
            raise RunFailure(f"record {self.cfg.primary_key}={rec[self.cfg.primary_key]!r} (batch {batch_index}, "
                             f"record {job.batch.start + i}) {what}: {c.error}; set on_bad_record=skip to send such "
                             f"records to the errors file")
        job.done[i] = c
        job.remaining -= 1
        self.demand -= job.demands[i]
        if job.remaining == 0:
            self._emit(self.inflight.pop(batch_index))

    def _emit(self, job: _InFlight) -> None:
        lines, errors = [], []
        prompt_tokens = output_tokens = 0
        b = job.batch
        for i, (record, c) in enumerate(zip(job.records, job.done)):
            assert c is not None
            if c.error == BAD_RECORD:  # the scan reported it
                continue
            if self.prompts.openai:  # every request has its line, an error line if it failed
                lines.append(output_line(record, c, self.cfg.model_name))
                if c.error is None:
                    prompt_tokens += c.prompt_tokens
                    output_tokens += c.output_tokens
                continue
            if c.error is not None:
                what = {REJECTED: "rejected by the engine", FAILED: "failed in the engine"}.get(c.error_kind, "skipped")
                errors.append({"position": b.start + i, "key": record[self.cfg.primary_key], "error": f"{what}: {c.error}"})
                continue
            metadata = None
            if self.cfg.return_metadata:
                metadata = {"finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                            "output_tokens": c.output_tokens, "rank": self.rank, "batch": b.index}
                if c.truncated_from is not None:
                    metadata["truncated_from"] = c.truncated_from
                if job.tries[i]:
                    metadata["retries"] = job.tries[i]
            lines.append(output_row(record, self.cfg.name, c, metadata, self.cfg.return_token_ids))
            prompt_tokens += c.prompt_tokens
            output_tokens += c.output_tokens
        self.outbox.put(BatchDone(b.index, b.start, b.stop, self.rank, lines, errors, prompt_tokens, output_tokens,
                                  round(time.monotonic() - job.claimed_at, 3)))
        s = self.stats
        s.records += len(lines)
        s.batches += 1
        s.prompt_tokens += prompt_tokens
        s.output_tokens += output_tokens

    def late(self) -> Optional[str]:
        """Why this rank has failed its batch_timeout, or None (the control thread's watchdog)."""
        now = time.monotonic()
        for job in list(self.inflight.values()):
            if now - job.claimed_at > self.cfg.batch_timeout:
                b = job.batch
                return (f"batch {b.index} (records {b.start}..{b.stop - 1}) on rank {self.rank} exceeded "
                        f"batch_timeout={self.cfg.batch_timeout}s; what was committed is kept: rerun with the "
                        f"same output_dir to resume")
        return None

    def run(self) -> RankStats:
        self.outbox.watchdog = self.late
        start = time.monotonic()
        self.stats.gen_start_unix = time.time()
        exhausted = False
        while True:
            self.outbox.check()
            while not exhausted and self._has_room():
                if not self._claim():
                    exhausted = True
            if not self.inflight:
                if exhausted and self.claims.may_grow(self.outbox.peer_states):
                    time.sleep(TICK_S)
                    exhausted = False
                    continue
                if exhausted:
                    break
                continue
            for c in self.engine.step():
                self.queued -= 1
                self._finish_request(c)
        if self.stats.batches:
            self.stats.busy_s = round(time.monotonic() - start, 3)
            self.stats.gen_end_unix = time.time()
        return self.stats
