"""What ranks tell each other: the control-plane states and the messages ranks send rank 0.

Typed dataclasses, sent as JSON (nothing received is unpickled): `BatchDone` is a
finished batch with its output lines (one output file) or the metadata of the part
its rank wrote (sharded), `RankStats` a rank's totals at its end, `RankEvent` a change
of the rank's state (a handful a run: engine ready, restarting, handing back, draining)
or its heartbeat, for rank 0's live status and the timeline (spmd_dp/status/).
`encode`/`decode` turn a list of them into bytes and back, each tagged with its type.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Dict, List, Optional, Union


class RankState(IntEnum):
    """A rank's engine, as every rank sees it on the status board (spmd_dp/control/board.py)."""

    STARTING = 0
    READY = 1
    FAILED = 2  # its engine could not start: it stays in the control plane with no work
    GAVE_UP = 3  # its engine failed mid-run for good: it handed its work back and takes no more

    @property
    def out(self) -> bool:
        """The rank takes no work (the others take its static share)."""
        return self in (RankState.FAILED, RankState.GAVE_UP)


@dataclass
class BatchDone:
    """A finished batch: slots [start, stop) of the record order (input order: records [start, stop)), as output
    lines for rank 0 to commit."""

    index: int  # "batch Y" of the logs
    start: int
    stop: int
    rank: int
    lines: List[str]  # one JSON object per generated record, in input order
    errors: List[Dict[str, Any]] = field(default_factory=list)  # records the engine refused (on_bad_record=skip)
    prompt_tokens: int = 0
    output_tokens: int = 0
    elapsed_s: float = 0.0  # claim to last finished request
    claimed_unix: float = 0.0  # wall clock of the claim (the timeline's span: claim to commit)
    # sharded output: the part its rank wrote (spmd_dp/output/shards.py) instead of the lines: name (None: no rows),
    # bytes, crc32, rows, schema (Parquet: its digest)
    part: Optional[Dict[str, Any]] = None
    # prefix affinity (start, stop are slots of the record order): the input position of each line or shard row,
    # ascending; None in input order
    positions: Optional[List[int]] = None

    @property
    def records(self) -> int:
        return self.part["rows"] if self.part is not None else len(self.lines)

    @property
    def nbytes(self) -> int:
        return sum(len(x) for x in self.lines) + len(self.lines)


@dataclass
class RankStats:
    """What one rank did; it sends this to rank 0 at its end, for the metrics."""

    rank: int
    records: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    engine_start_s: float = 0.0
    busy_s: float = 0.0  # first claim to last finished batch
    gen_start_unix: float = 0.0  # wall clock of the first claim and of the last finished batch,
    gen_end_unix: float = 0.0  # to measure the run's generation span across ranks
    engine_failed: Optional[str] = None  # why this rank stopped generating (at start or mid-run)
    failed_at_s: Optional[float] = None  # when: seconds into the run (since rank 0's metrics started)
    failed_at_unix: Optional[float] = None
    engine_restarts: int = 0
    engine_faults: List[str] = field(default_factory=list)  # each fault of its engine, in order
    handed_back: int = 0  # batches it handed back to the other ranks
    claims: int = 0  # claims it made (those that found a batch and those that did not)
    claim_s: float = 0.0  # time in them (the rendezvous store's round trips)
    control_cpu_s: float = 0.0  # its control thread's CPU until it sent this (docs/scale.md)
    peak_rss_mb: float = 0.0  # its peak resident memory
    prefix_cache_hits: int = 0  # prompt tokens its engine's prefix cache served (vLLM: num_cached_tokens) ...
    prefix_cache_queries: int = 0  # ... of the prompt tokens of the requests whose engine said (0: none did)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def prefix_cache_hit_rate(self) -> Optional[float]:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else None

    @property
    def nbytes(self) -> int:
        return 0


# RankEvent.kind
READY, FAILED_START, GENERATING, RESTARTING, GAVE_UP, HANDED_BACK, DRAINING, BEAT = (
    "ready", "failed", "generating", "restarting", "gave up", "handed back", "draining", "beat")


@dataclass
class RankEvent:
    """A change on a rank, as it happens (rare), or its heartbeat (BEAT: its control thread's, every few seconds)."""

    rank: int
    kind: str  # READY (again after a restart), FAILED_START, GENERATING, RESTARTING, GAVE_UP, HANDED_BACK, DRAINING, BEAT
    unix: float
    detail: str = ""  # the cause (RESTARTING, GAVE_UP, FAILED_START), the signal (DRAINING)
    value: float = 0.0  # READY: engine start seconds; HANDED_BACK: batches; BEAT: seconds since its loop went round
    host: str = ""  # READY, FAILED_START and the first BEAT: the rank's host
    batches: List[List[float]] = field(default_factory=list)  # HANDED_BACK: [batch index, claimed_unix] each

    @property
    def nbytes(self) -> int:
        return 0


Message = Union[BatchDone, RankStats, RankEvent]
_TYPES = {"batch": BatchDone, "stats": RankStats, "event": RankEvent}
_TAGS = {cls: tag for tag, cls in _TYPES.items()}


def encode(messages: List[Message]) -> bytes:
    return json.dumps([{"type": _TAGS[type(m)], **asdict(m)} for m in messages]).encode()


def decode(data: bytes) -> List[Message]:
    out: List[Message] = []
    for d in json.loads(data):
        cls = _TYPES[d.pop("type")]
        out.append(cls(**d))
    return out
