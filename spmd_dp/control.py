"""The control plane: a thread per rank that streams finished batches to rank 0 and agrees on the end.

Each round, on its own gloo group, every rank all-gathers a small status vector
(engine state, done flag, payload size); ranks with messages in their outbox then
send them (JSON bytes) to rank 0, whose handler (spmd_dp/rank0.py) commits them at
once. Rank 0 therefore holds only the batches of one round, never the dataset.
The loop ends in the round where every rank says done: that is the termination
agreement. A dead or stuck peer makes a collective fail within the group's
timeout, and the error reaches the generation loop through the outbox, so nothing hangs.

The thread is also the rank's watchdog: every round it asks the generation loop
(`outbox.watchdog`) for a batch older than `batch_timeout`; one fails the rank with
a message naming rank and batch, even if the engine itself is stuck (then the
process exits from this thread after a grace period).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Callable, List, Optional

from spmd_dp.comm import Group
from spmd_dp.errors import RunFailure
from spmd_dp.messages import Message, RankState, decode, encode
from spmd_dp.outbox import Outbox
from spmd_dp.procs import terminate_children

MAX_ROUND_BYTES = 8 << 20  # a rank sends at most this much per round (more waits for the next)
STUCK_GRACE_S = 30.0  # a rank whose generation loop does not react to its own failure exits after this

Handler = Callable[[List[Message]], None]


class ControlPlane(threading.Thread):
    """Streams each rank's outbox to rank 0's handler; tracks every rank's state; ends when all are done."""

    def __init__(self, group: Group, outbox: Outbox, handler: Optional[Handler], tick_s: float = 0.2) -> None:
        """handler: rank 0's (it receives every rank's messages); None on the other ranks."""
        super().__init__(name="spmd_dp-control", daemon=True)
        assert (handler is not None) == (group.rank == 0), "rank 0, and only rank 0, handles the messages"
        self.group, self.outbox, self.handler, self.tick_s = group, outbox, handler, tick_s
        self.all_done = threading.Event()

    def _drain(self) -> List[Message]:
        items: List[Message] = []
        size = 0
        try:
            items.append(self.outbox.queue.get(timeout=self.tick_s))
            while size < MAX_ROUND_BYTES:
                items.append(self.outbox.queue.get_nowait())
                size += items[-1].nbytes
        except queue.Empty:
            pass
        return items

    def run(self) -> None:
        box = self.outbox
        try:
            while True:
                finished = box.finished  # read before draining: everything put before it is drained now
                items = self._drain()
                done = finished and box.queue.empty()
                payload = encode(items) if items else b""
                table = self.group.all_gather_ints([int(box.state), int(done), len(payload)])
                box.peer_states = [RankState(row[0]) for row in table]
                for data in self._to_rank0(payload, [row[2] for row in table]):
                    self.handler(decode(data))
                if all(row[1] for row in table):
                    break
                self._watch()
        except BaseException as e:  # handed to the generation loop, which fails the rank
            if box.error is None:
                box.error = e
        finally:
            self.all_done.set()
        self._exit_if_stuck()

    def _watch(self) -> None:
        late = self.outbox.watchdog() if self.outbox.watchdog is not None else None
        if late is not None and self.outbox.error is None:
            self.outbox.error = RunFailure(late)
            raise self.outbox.error

    def _exit_if_stuck(self) -> None:
        """The generation loop picks up the error at its next step; if it is stuck, end the process."""
        error = self.outbox.error
        if not isinstance(error, RunFailure):
            return
        if not self.outbox.acknowledged.wait(STUCK_GRACE_S) and threading.main_thread().is_alive():
            print(f"spmd_dp: error: {error} (the engine did not return; exiting)", file=sys.stderr, flush=True)
            terminate_children()
            os._exit(1)

    def _to_rank0(self, payload: bytes, sizes: List[int]) -> List[bytes]:
        """Every rank's payload of this round, on rank 0 (in rank order); [] on the others."""
        if self.group.rank != 0:
            if payload:
                self.group.send_bytes(payload, 0)
            return []
        receives = [self.group.recv_bytes(sizes[r], r) for r in range(1, self.group.world) if sizes[r]]
        return [p for p in [payload] + [r.result() for r in receives] if p]

    def wait_done(self) -> None:
        """Wait for the end agreed by all ranks. Bounded: each round is a collective with a timeout."""
        while not self.all_done.wait(1.0):
            if not self.is_alive():
                break
        self.outbox.check()
