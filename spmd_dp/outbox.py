"""The generation loop's side of the control plane: where it puts finished work and learns about its peers.

The loop does not import the control plane (nor torch): it puts messages here,
sets its own engine state, reads its peers' states, and calls `check()`, which
raises in its thread what went wrong in the control thread (a peer lost, its
own batch timed out). The control thread (spmd_dp/control.py) drains the queue
every round and writes back what it learns.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, List, Optional

from spmd_dp.errors import RunFailure
from spmd_dp.messages import Message, RankState


class Outbox:
    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.queue: "queue.Queue[Message]" = queue.Queue()
        self.state = RankState.STARTING  # this rank's engine, sent to every rank each round
        self.finished = False  # set after the loop's last put(): the control thread may end
        self.peer_states: List[RankState] = [RankState.STARTING] * world  # as of the last round
        self.error: Optional[BaseException] = None  # set by the control thread
        self.acknowledged = threading.Event()  # the loop has taken up self.error
        self.watchdog: Optional[Callable[[], Optional[str]]] = None  # why this rank is late, or None

    def put(self, message: Message) -> None:
        self.queue.put(message)

    def finish(self) -> None:
        self.finished = True

    def ranks_in(self, state: RankState) -> List[int]:
        return [r for r, s in enumerate(self.peer_states) if s == state]

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
