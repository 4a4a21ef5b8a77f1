"""The generation loop's side of the control plane: where it puts finished work and learns about its peers.

The loop does not import the control plane (nor torch): it puts messages here,
sets its own state (engine state, idle, a heartbeat), reads what the board last said
about its peers (spmd_dp/board.py: ranks reported, ranks out and their states, ranks
idle, batches rank 0 has committed, batches handed back), and calls `check()`, which
raises in its thread what went wrong in the control thread (a peer lost, the loop
itself stuck). The control thread (spmd_dp/control.py) drains the queue and writes
back what it reads. The engine state and the idle flag go to the board as they change.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Dict, List, Optional

from spmd_dp.drain import Drain
from spmd_dp.errors import Drained, RunFailure
from spmd_dp.messages import Message, RankState


class Outbox:
    def __init__(self, rank: int, world: int, drain: Optional[Drain] = None, board=None) -> None:
        """board: the run's Board (spmd_dp/board.py); None for a world of one without a store (tests)."""
        self.rank, self.world, self.board = rank, world, board
        self.queue: "queue.Queue[Message]" = queue.Queue()
        self._state = RankState.STARTING  # this rank's engine
        self._idle = False  # the loop holds no batch and found none to claim
        self.finished = False  # set after the loop's last put(): the control thread may end
        # the peers, as of the board's last read
        self.out: Dict[int, RankState] = {}  # ranks that take no work, and why
        self.n_reported = 0  # ranks whose engines started or failed
        self.n_idle = 0  # ranks idle or out
        self.committed = 0  # batches rank 0 has committed
        self.returned = 0  # batches handed back so far
        self.rounds = 0  # reads of the board so far
        self.drain = drain if drain is not None else Drain(0.0)
        self.error: Optional[BaseException] = None  # set by the control thread
        self.acknowledged = threading.Event()  # the loop has taken up self.error
        self.heartbeat: Optional[float] = None  # when the generation loop last went round (None: not in it)

    @property
    def state(self) -> RankState:
        return self._state

    @state.setter
    def state(self, state: RankState) -> None:
        self._state = state
        if self.board is not None:
            self.board.report(state)
        if state.out:
            self.idle = True

    @property
    def idle(self) -> bool:
        return self._idle

    @idle.setter
    def idle(self, idle: bool) -> None:
        """Said before a claim (False) and when no batch is left to this rank (True): on the board at once, so that
        no rank sees every rank idle while one claims."""
        self._idle = idle or self._state.out
        if self.board is not None:
            self.board.set_idle(self._idle)

    def put(self, message: Message) -> None:
        self.queue.put(message)

    def finish(self) -> None:
        self.heartbeat = None
        self.finished = True

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def reported(self) -> int:
        """Ranks whose engines have started or failed (this one's as it knows it)."""
        if self.board is None:
            return int(self._state != RankState.STARTING)
        return max(self.n_reported, int(self._state != RankState.STARTING))

    def everyone_idle(self) -> bool:
        """Every rank idle or out, as of the board's last read."""
        return (self.n_idle if self.board is not None else int(self._idle)) >= self.world

    @property
    def peer_states(self) -> List[RankState]:
        """Each rank's state as far as the board tells: out ranks' own; the others READY once all reported."""
        others = RankState.READY if self.reported() >= self.world else RankState.STARTING
        return [self._state if r == self.rank else self.out.get(r, others) for r in range(self.world)]

    def ranks_in(self, *states: RankState) -> List[int]:
        return [r for r, s in enumerate(self.peer_states) if s in states]

    def raise_if_stopped(self, engine_failed: Optional[str], n_batches: int, is_rank0: bool) -> None:
        """After the end agreement: no rank could generate (exit 1), or a drain stopped the run early (rank 0
        says so with the counts, in Rank0.finish)."""
        out = {**self.out, **({self.rank: self._state} if self._state.out else {})}
        if len(out) == self.world:
            what = "start its engine" if all(s == RankState.FAILED for s in out.values()) else "keep its engine running"
            raise RunFailure(f"no rank could {what} (this rank: {engine_failed}); see the log of each rank; what "
                             f"was committed is kept: rerun with the same output_dir to resume")
        if self.drain.requested and not is_rank0 and self.committed < n_batches:
            raise Drained(f"stopped by {self.drain.why} after draining; rank 0's line says what was committed; "
                          f"rerun with the same output_dir to resume", self.drain.signum)

    def check(self) -> None:
        """Raise the control plane's error in the caller's thread."""
        if self.error is None:
            return
        self.acknowledged.set()
        if isinstance(self.error, RunFailure):
            raise self.error
        text = str(self.error).strip()
        first = text.splitlines()[0] if text else type(self.error).__name__
        raise RunFailure(f"rank {self.rank} lost the other ranks ({first}); a rank failed or died: see its "
                         f"log. Rerun with the same output_dir (or torchrun --max-restarts) to resume") from self.error
