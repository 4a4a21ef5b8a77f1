"""The generation loop's side of the control plane, one direction: out.

The loop puts what it finished here (`BatchDone` through its sink, `RankStats` at its end) and sets its own
state: its engine's state and whether it is idle (both written to the board as they change, so that no
peer sees this rank idle while it claims) and a heartbeat the control thread watches. What comes back
(the peers, the control plane's errors) is spmd_dp/control/peers.py. No torch here.
"""

from __future__ import annotations

import queue
import socket
import time
from typing import Optional

from spmd_dp.control.messages import FAILED_START, READY, Message, RankEvent, RankState


class Outbox:
    def __init__(self, board=None, rank: int = 0) -> None:
        """board: the run's Board (spmd_dp/control/board.py); None for a world of one without a store (tests)."""
        self.board, self.rank = board, rank
        self.queue: "queue.Queue[Message]" = queue.Queue()
        self._state = RankState.STARTING  # this rank's engine
        self._idle = False  # the loop holds no batch and found none to claim
        self.finished = False  # set after the loop's last put(): the control thread may end
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

    def event(self, kind: str, **fields) -> None:
        """Tell rank 0 that this rank's state changed (spmd_dp/control/messages.py: RankEvent)."""
        self.queue.put(RankEvent(self.rank, kind, round(time.time(), 3), **fields))

    def engine_started(self, up: bool, start_s: float, why: Optional[str] = None) -> None:
        """The rank's engine is up (READY) or could not start (FAILED): on the board, and an event for rank 0."""
        self.state = RankState.READY if up else RankState.FAILED
        self.event(READY if up else FAILED_START, detail=why or "", value=start_s, host=socket.gethostname())

    def finish(self) -> None:
        self.heartbeat = None
        self.finished = True

    def beat(self) -> None:
        self.heartbeat = time.monotonic()
