"""The control plane: a thread per rank that streams finished batches to rank 0 and agrees on the end.

Each round, on its own gloo group, every rank all-gathers a small status vector
(engine state, done flag, payload size, idle flag, the batches rank 0 has committed,
the signal of a drain); ranks with messages in their outbox then send them (JSON
bytes) to rank 0, whose handler (spmd_dp/rank0.py) commits them at once. Rank 0
therefore holds only the batches of one round, never the dataset. The loop ends in
the round where every rank says done: that is the termination agreement. A drain on
one rank (spmd_dp/drain.py) reaches every rank in the next round.

A rank that leaves the run on an error first writes its reason in the store
(`leaving`); when a collective then fails on the others, they report that rank and
its reason ("rank 1 exited: ..."), not the transport's message. A dead or stuck peer
makes a collective fail within the group's timeout, and the error reaches the
generation loop through the outbox, so nothing hangs.

The thread is also the last-resort watchdog of its rank: the generation loop bounds
each engine step itself (spmd_dp/engines/supervisor.py), so a loop that has not gone
round for `batch_timeout` + STUCK_GRACE_S is stuck elsewhere; the rank then fails, and
if the loop does not react, the process exits from this thread after a grace period.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Set

from spmd_dp.comm import Group
from spmd_dp.errors import Drained, PeerLost, RunFailure, UsageError
from spmd_dp.log import logger
from spmd_dp.messages import BatchDone, Message, RankState, decode, encode
from spmd_dp.outbox import Outbox
from spmd_dp.procs import terminate_children

MAX_ROUND_BYTES = 8 << 20  # a rank sends at most this much per round (more waits for the next)
STUCK_GRACE_S = 30.0  # a rank whose generation loop does not react to its own failure exits after this
ROLL_CALL_S = 5.0  # after a failed collective, how long survivors wait for each other's names in the store

Handler = Callable[[List[Message]], None]


class ControlPlane(threading.Thread):
    """Streams each rank's outbox to rank 0's handler; tracks every rank's state; ends when all are done."""

    def __init__(self, group: Group, outbox: Outbox, handler: Optional[Handler], batch_timeout: float = 600.0,
                 tick_s: float = 0.2, writer: Optional[Callable[[BatchDone], BatchDone]] = None) -> None:
        """handler: rank 0's (it receives every rank's messages); None on the other ranks. writer: output_mode=sharded,
        this rank's ShardWriter (spmd_dp/shards.py): a batch's rows become a part, and only its metadata leaves."""
        super().__init__(name="spmd_dp-control", daemon=True)
        assert (handler is not None) == (group.rank == 0), "rank 0, and only rank 0, handles the messages"
        self.group, self.outbox, self.handler, self.tick_s, self.writer = group, outbox, handler, tick_s, writer
        self.stuck_s = batch_timeout + STUCK_GRACE_S
        self.all_done = threading.Event()
        self.committed: Set[int] = set()  # rank 0: the batches handed to the handler (it commits each at once)

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
                if self.writer is not None:
                    items = [self.writer(m) if isinstance(m, BatchDone) else m for m in items]
                done = finished and box.queue.empty()
                payload = encode(items) if items else b""
                table = self.group.all_gather_ints([int(box.state), int(done), len(payload), int(box.idle),
                                                    len(self.committed), box.drain.signum])
                box.peer_states = [RankState(row[0]) for row in table]
                box.peer_idle = [bool(row[3]) for row in table]
                box.committed = table[0][4]
                box.rounds += 1
                self._spread_drain([row[5] for row in table])
                for data in self._to_rank0(payload, [row[2] for row in table]):
                    messages = decode(data)
                    self.handler(messages)
                    self.committed.update(m.index for m in messages if isinstance(m, BatchDone))
                if all(row[1] for row in table):
                    break
                self._watch()
        except BaseException as e:  # handed to the generation loop, which fails the rank
            if box.error is None:
                box.error = e if isinstance(e, RunFailure) else PeerLost(self._who_left(e))
        finally:
            self.all_done.set()
        self._exit_if_stuck()

    def _spread_drain(self, signals: List[int]) -> None:
        drain = self.outbox.drain
        if drain.requested:
            return
        for rank, signum in enumerate(signals):
            if signum:
                drain.request(signum, f"{signal.Signals(signum).name} on rank {rank}")
                return

    def _watch(self) -> None:
        beat = self.outbox.heartbeat
        if beat is not None and time.monotonic() - beat > self.stuck_s and self.outbox.error is None:
            self.outbox.error = RunFailure(
                f"rank {self.group.rank}: the generation loop has not gone round for {self.stuck_s:g}s (engine steps "
                f"are bounded by batch_timeout: something else is stuck); what was committed is kept: rerun with "
                f"the same output_dir to resume")
            raise self.outbox.error

    def _exit_if_stuck(self) -> None:
        """The generation loop picks up the error at its next step; if it is stuck, end the process."""
        error = self.outbox.error
        if not isinstance(error, RunFailure) or self.outbox.finished:
            return
        if not self.outbox.acknowledged.wait(STUCK_GRACE_S) and threading.main_thread().is_alive():
            self.leaving(error)
            print(f"spmd_dp: error: {error} (the generation loop did not return; exiting)", file=sys.stderr,
                  flush=True)
            terminate_children()
            os._exit(1)

    def leaving(self, error: BaseException) -> None:
        """This rank leaves the run on an error of its own: say why, for the others to report (best effort,
        bounded). Not for a peer's exit, a drain or bad input (every rank has those)."""
        if isinstance(error, (PeerLost, Drained, UsageError)):
            return
        text = str(error).strip()
        reason = text.splitlines()[0] if text else ""
        if not isinstance(error, RunFailure):
            reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        try:
            self.group.notes.set(f"exit/{self.group.rank}", reason)
        except Exception as e:  # the store may be gone with rank 0
            logger.debug("could not leave a note in the store: %s", e)

    def _who_left(self, error: BaseException) -> str:
        """A collective failed: name the ranks that left, from their notes in the store and a roll call."""
        me, world, notes = self.group.rank, self.group.world, self.group.notes
        text = str(error).strip()
        transport = text.splitlines()[0][:200] if text else type(error).__name__
        resume = "rerun with the same output_dir (or torchrun --max-restarts) to resume"
        try:
            notes.set(f"here/{me}", "1")
            deadline = time.monotonic() + ROLL_CALL_S
            while True:
                here = [r for r in range(world) if notes.check([f"here/{r}"])]
                left = [r for r in range(world) if notes.check([f"exit/{r}"])]
                if len(here) + len(left) >= world or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            said = [f"rank {r} exited: {notes.get(f'exit/{r}').decode()}" for r in left]
            silent = [r for r in range(world) if r not in here and r not in left]
        except Exception:  # without torchrun rank 0 hosts the store: it is gone with it
            return f"rank {me} lost the other ranks: rank 0 exited or is unreachable (see its line); {resume}"
        if silent:
            said.append(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} left without a word "
                        f"(killed? out of memory? see torchrun's summary or its log)")
        if not said:
            said.append(f"the control plane failed ({transport})")
        return f"rank {me} stops: {'; '.join(said)}; {resume}"

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
