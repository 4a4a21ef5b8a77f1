"""The generation loop of one rank: claim batches, keep the engine full, put finished batches in the outbox.

The loop keeps enough claimed batches in flight that the engine always has more
than its `capacity` (vLLM's max_num_seqs) requests queued: a new batch is
claimed as soon as the queue falls below capacity + batch_size, unless the
requests queued already need more tokens (prompt + max_tokens) than the engine's
KV cache holds: more would only wait in this rank's queue while another rank runs
dry, which under dynamic scheduling is work better left unclaimed. A batch is done
when its last request finishes; its output lines go to the outbox, from which the
control thread streams them to rank 0. A batch older than `batch_timeout` fails the rank.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from spmd_dp.batches import Batch, Claims
from spmd_dp.config import RunConfig, sampling_kwargs
from spmd_dp.engines.base import Completion, Engine, Request
from spmd_dp.errors import RunFailure
from spmd_dp.inputs import InputIndex, read_batch
from spmd_dp.messages import BatchDone, RankStats
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


SKIPPED = "skipped: a bad input record"


def token_demand(request: Request) -> int:
    """KV tokens a request may need: its prompt (token ids, or ~4 characters a token) plus its outputs."""
    prompt = request.prompt
    if isinstance(prompt, list):
        n = len(prompt)
    else:
        text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt.messages)
        n = len(text) // 4 + 1
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
        sampling = self.prompts.sampling(self.sampling, record)
        seed = sampling.pop("seed", self.seed)
        if seed is not None:
            sampling["seed"] = record_seed(seed, record[self.cfg.primary_key])
        return Request(f"{batch.index}:{i}", self.prompts.build(record), sampling)

    def _claim(self) -> bool:
        batch = self.claims.next(self.outbox.peer_states)
        if batch is None:
            return False
        records = read_batch(self.index, batch.start, batch.stop)
        job = _InFlight(batch, records, time.monotonic(), [None] * len(records), len(records), [0] * len(records))
        self.inflight[batch.index] = job
        settled = []  # skipped bad records and requests the engine refused
        for i, record in enumerate(records):
            if record is None:
                settled.append(Completion(f"{batch.index}:{i}", error=SKIPPED))
                continue
            request = self._request(batch, i, record)
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

    def _finish_request(self, c: Completion) -> None:
        batch_index, i = (int(x) for x in c.request_id.split(":"))
        job = self.inflight[batch_index]
        if c.error is not None and c.error != SKIPPED and self.cfg.on_bad_record == "fail":
            rec = job.records[i]
            raise RunFailure(f"record {self.cfg.primary_key}={rec[self.cfg.primary_key]!r} (batch {batch_index}, "
                             f"record {job.batch.start + i}) was rejected by the engine: {c.error}; set "
                             f"on_bad_record=skip to send such records to the errors file")
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
            if c.error is not None:
                if c.error != SKIPPED:  # the scan reported the skipped ones
                    errors.append({"position": b.start + i, "key": record[self.cfg.primary_key],
                                   "error": f"rejected by the engine: {c.error}"})
                continue
            metadata = None
            if self.cfg.return_metadata:
                metadata = {"finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                            "output_tokens": c.output_tokens, "rank": self.rank, "batch": b.index}
            lines.append(output_row(record, self.cfg.name, c.texts, metadata))
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
