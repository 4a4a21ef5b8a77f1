"""The control plane: a thread per rank that streams finished batches to rank 0 and agrees on the end.

Each round, on its own gloo group, every rank all-gathers a small status vector
(engine state, done flag, payload size); ranks with finished batches then send
them (JSON bytes) to rank 0, which hands them to its sink (the committer) at
once. Rank 0 therefore holds only the batches of one round, never the dataset.
The loop ends in the round where every rank says done: that is the termination
agreement. A dead or stuck peer makes a collective fail within the group's
timeout, and the error reaches the generation loop, so nothing hangs.

The thread is also the rank's watchdog: every round it asks the generation loop
for its oldest batch; one older than `batch_timeout` fails the rank with a
message naming rank and batch, even if the engine itself is stuck (then the
process exits from this thread after a grace period).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from typing import Callable, Dict, List, Optional

import torch

from spmd_dp.comm import Group
from spmd_dp.errors import RunFailure
from spmd_dp.procs import terminate_children

STARTING, READY, FAILED = 0, 1, 2
STATE_NAMES = {STARTING: "starting", READY: "ready", FAILED: "failed"}
MAX_ROUND_BYTES = 8 << 20  # a rank sends at most this much per round (more waits for the next)
STUCK_GRACE_S = 30.0  # a rank whose generation loop does not react to its own failure exits after this


class ControlPlane(threading.Thread):
    """Streams each rank's outbox to rank 0's sink; tracks every rank's state; ends when all are done."""

    def __init__(self, group: Group, sink: Optional[Callable[[List[Dict]], None]], tick_s: float = 0.2) -> None:
        super().__init__(name="spmd_dp-control", daemon=True)
        self.group, self.rank, self.world, self.sink, self.tick_s = group, group.rank, group.world, sink, tick_s
        self.watchdog: Optional[Callable[[], Optional[str]]] = None  # returns why the rank is late, or None
        self.acknowledged = threading.Event()  # the generation loop has taken up self.error
        self.outbox: "queue.Queue[Dict]" = queue.Queue()
        self.state = STARTING
        self.finished = False  # set by the generation loop after its last put()
        self.peer_states: List[int] = [STARTING] * self.world
        self.all_done = threading.Event()
        self.error: Optional[BaseException] = None
        self.rounds = 0

    # -- called from the generation loop -------------------------------------------------
    def put(self, item: Dict) -> None:
        self.outbox.put(item)

    def finish(self) -> None:
        self.finished = True

    def check(self) -> None:
        """Raise the control plane's error in the caller's thread."""
        if self.error is not None:
            self.acknowledged.set()
        if isinstance(self.error, RunFailure):
            raise self.error
        if self.error is not None:
            first = str(self.error).strip().splitlines()[0] if str(self.error).strip() else type(self.error).__name__
            raise RunFailure(f"rank {self.rank} lost the other ranks ({first}); a rank failed or died: see its "
                             f"log. Rerun with the same output_dir (or torchrun --max-restarts) to resume") from self.error

    def ranks_in(self, state: int) -> List[int]:
        return [r for r, s in enumerate(self.peer_states) if s == state]

    # -- the thread ---------------------------------------------------------------------------
    def _drain(self) -> List[Dict]:
        items, size = [], 0
        try:
            items.append(self.outbox.get(timeout=self.tick_s))
            while size < MAX_ROUND_BYTES:
                items.append(self.outbox.get_nowait())
                size += items[-1].get("nbytes", 0)
        except queue.Empty:
            pass
        return items

    def run(self) -> None:
        try:
            while True:
                finished = self.finished  # read before draining: everything put before it is drained now
                items = self._drain()
                done = finished and self.outbox.empty()
                payload = json.dumps(items).encode() if items else b""
                table = self.group.all_gather(torch.tensor([self.state, int(done), len(payload)], dtype=torch.int64))
                self.peer_states = [int(t[0]) for t in table]
                received = self._to_rank0(payload, [int(t[2]) for t in table])
                if received is not None and self.sink is not None:
                    for r, data in enumerate(received):
                        if data:
                            self.sink(json.loads(data))
                self.rounds += 1
                if all(int(t[1]) for t in table):
                    break
                self._watch()
        except BaseException as e:  # handed to the generation loop, which fails the rank
            if self.error is None:
                self.error = e
        finally:
            self.all_done.set()
        self._exit_if_stuck()

    def _watch(self) -> None:
        late = self.watchdog() if self.watchdog is not None else None
        if late is not None and self.error is None:
            self.error = RunFailure(late)
            raise self.error

    def _exit_if_stuck(self) -> None:
        """The generation loop picks up self.error at its next step; if it is stuck, end the process."""
        if not isinstance(self.error, RunFailure):
            return
        if not self.acknowledged.wait(STUCK_GRACE_S) and threading.main_thread().is_alive():
            print(f"spmd_dp: error: {self.error} (the engine did not return; exiting)", file=sys.stderr, flush=True)
            terminate_children()
            os._exit(1)

    def _to_rank0(self, payload: bytes, sizes: List[int]) -> Optional[List[bytes]]:
        if self.rank != 0:
            if payload:
                self.group.send_bytes(payload, 0)
            return None
        received: List[bytes] = [b""] * self.world
        received[0] = payload
        pending = []
        for r in range(1, self.world):
            if sizes[r]:
                pending.append((r, *self.group.recv_bytes(sizes[r], r)))
        for r, buf, work in pending:
            work.wait()
            received[r] = buf.numpy().tobytes()
        return received

    def wait_done(self) -> None:
        """Wait for the end agreed by all ranks. Bounded: each round is a collective with a timeout."""
        while not self.all_done.wait(1.0):
            if not self.is_alive():
                break
        self.check()
