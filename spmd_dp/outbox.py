"""The generation loop's side of the control plane: where it puts finished work and learns about its peers.

The loop does not import the control plane (nor torch): it puts messages here,
sets its own state (engine state, idle, a heartbeat), reads what the last round
told about its peers (their states, whether they are idle, how many batches rank
0 has committed), and calls `check()`, which raises in its thread what went wrong
in the control thread (a peer lost, the loop itself stuck). The control thread
(spmd_dp/control.py) drains the queue every round and writes back what it learns.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import List, Optional

from spmd_dp.drain import Drain
from spmd_dp.errors import Drained, RunFailure
from spmd_dp.messages import Message, RankState


class Outbox:
    def __init__(self, rank: int, world: int, drain: Optional[Drain] = None) -> None:
        self.rank = rank
        self.queue: "queue.Queue[Message]" = queue.Queue()
        self.state = RankState.STARTING  # this rank's engine, sent to every rank each round
        self.idle = False  # the loop holds no batch and found none to claim
        self.finished = False  # set after the loop's last put(): the control thread may end
        self.peer_states: List[RankState] = [RankState.STARTING] * world  # as of the last round
        self.peer_idle: List[bool] = [False] * world
        self.rounds = 0  # control rounds so far
        self.committed = 0  # batches rank 0 has committed, as of the last round
        self.drain = drain if drain is not None else Drain(0.0)
        self.error: Optional[BaseException] = None  # set by the control thread
        self.acknowledged = threading.Event()  # the loop has taken up self.error
        self.heartbeat: Optional[float] = None  # when the generation loop last went round (None: not in it)

    def put(self, message: Message) -> None:
        self.queue.put(message)

    def finish(self) -> None:
        self.heartbeat = None
        self.finished = True

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def reported(self) -> int:
        """Ranks whose engines have started or failed (this one's as it knows it; the others' as of the last round)."""
        mine = self.state != RankState.STARTING
        return sum(1 for r, s in enumerate(self.peer_states) if s != RankState.STARTING or (r == self.rank and mine))

    def ranks_in(self, *states: RankState) -> List[int]:
        return [r for r, s in enumerate(self.peer_states) if s in states]

    def raise_if_stopped(self, engine_failed: Optional[str], n_batches: int, is_rank0: bool) -> None:
        """After the end agreement: no rank could generate (exit 1), or a drain stopped the run early (rank 0
        says so with the counts, in Rank0.finish)."""
        world = len(self.peer_states)
        if len(self.ranks_in(RankState.FAILED, RankState.GAVE_UP)) == world:
            what = "start its engine" if len(self.ranks_in(RankState.FAILED)) == world else "keep its engine running"
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
