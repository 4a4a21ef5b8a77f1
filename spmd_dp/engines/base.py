"""The engine interface: what the generation loop needs from vLLM or the echo engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Union


class EngineStartError(Exception):
    """The engine could not start on this rank (the rank stays in the run with no work)."""


class EngineFailure(Exception):
    """The engine died or stalled mid-run (spmd_dp/engines/supervisor.py): its requests are lost.

    The generation loop then hands its work back (stalled) or keeps it, and calls the supervisor's
    `restart()`, which rebuilds the engine or raises `EngineGaveUp`."""

    def __init__(self, cause: str, stalled: bool = False) -> None:
        super().__init__(cause)
        self.cause, self.stalled = cause, stalled


class EngineGaveUp(Exception):
    """The rank's engine failed and cannot be restarted (max_engine_restarts used, or it cannot start)."""


@dataclass
class Request:
    request_id: str
    prompt: Union[str, List[int]]
    sampling: Dict[str, Any]  # SamplingParams keyword arguments


@dataclass
class Completion:
    request_id: str
    texts: List[str] = field(default_factory=list)  # one per completion (generation_options.n)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None  # the request was rejected (e.g. prompt longer than max_model_len)


class Engine(Protocol):
    capacity: int  # requests it runs at once (vLLM's max_num_seqs); keep more than this queued
    kv_tokens: Optional[int]  # tokens its KV cache holds (None: no limit); queued work beyond it only waits

    def add(self, request: Request) -> Optional[Completion]:
        """Queue a request; a rejected one comes back at once as a Completion with an error."""

    def step(self) -> List[Completion]:
        """Advance; return the requests that finished."""

    def close(self) -> None: ...
