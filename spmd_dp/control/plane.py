"""The control plane: a thread per rank that streams finished batches to rank 0 and agrees on the end.

It reads the rank's outbox (spmd_dp/control/outbox.py) and writes what it learns for the generation loop into
the rank's `Peers` (spmd_dp/control/peers.py); on rank 0 a receive thread fills rank 0's inbox with every
other rank's messages. One direction per queue.

Nothing here goes round all ranks in lockstep: what a rank sends, it sends when it has it, and
what it must know about the others it reads from the board (spmd_dp/control/board.py), so the cost per
batch does not grow with the number of ranks (docs/scale.md: it did, with a per-round all-gather).

- Messages (messages.py, JSON) go from a rank to rank 0 over the control group (gloo), point to
  point: what the rank's outbox holds, once every `flush_s` (at once for its last message, or when
  MAX_MESSAGE_BYTES wait; a message's header says its size and whether it is the rank's last). So
  rank 0 gets at most world / flush_s = MESSAGES_PER_S messages a second, however many ranks there are.
  (With sharded output the rank's sink wrote the batch's part already: only its metadata goes.)
  Rank 0 receives from any rank in a thread of its own, into its inbox, and every `poll_s` commits what
  arrived with its own finished batches in one call of its handler (spmd_dp/rank0.py: one journal line,
  one fsync, one add to the board for all of them).
- The board: every rank reads it every `poll_s` (world / READS_PER_S, at least a tick) and writes its
  own changes: its engine's state and idle flag (through the outbox), a drain (a signal on one rank
  drains every rank at their next read), the batches rank 0 committed.
- The end agreement: a rank's last message says it is done; rank 0, once every rank has said so and
  all is committed, sets `end` on the board; each rank leaves when it reads it.
- A rank that leaves: each rank watches the next one on a ring (r watches r + 1) with a receive that
  ends when that peer says goodbye at the end, or fails as soon as its process is gone (gloo sees the
  connection close: kill -9, the OOM killer, a lost node). The control group connects a pair of ranks on
  its first message, so the ring's pairs are connected first (a hello each way, Group.hello). The watcher
  names it, with the reason the peer left in the store if it left on an error of its own (`leaving`), on
  the board: every rank stops with that line. A rank leaving on its own error puts that line on the board
  itself and waits (bounded) until the others have read it before it exits: under torchrun its exit stops
  them. A send to rank 0 fails the same way when rank 0 is gone.
- Last-resort watchdog of its rank: the generation loop bounds each engine step itself
  (spmd_dp/engines/supervisor.py), so a loop that has not gone round for `batch_timeout` +
  STUCK_GRACE_S is stuck elsewhere; the rank then fails, and if the loop does not react, the process
  exits from this thread after a grace period.
"""

from __future__ import annotations

import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, List, Optional, Set, Union

from spmd_dp.control.board import View
from spmd_dp.errors import Drained, PeerLost, RunFailure, UsageError
from spmd_dp.log import logger
from spmd_dp.control.messages import BEAT, Message, RankEvent, RankStats, decode, encode
from spmd_dp.control.outbox import Outbox
from spmd_dp.control.peers import Peers
from spmd_dp.launch.procs import terminate_children

if TYPE_CHECKING:  # a world of one imports no torch (spmd_dp/control/comm.py)
    from spmd_dp.control.gloo import Group
    from spmd_dp.control.local import LocalGroup

MAX_MESSAGE_BYTES = 8 << 20  # a rank sends at most this much in one message (more goes in the next)
STUCK_GRACE_S = 30.0  # a rank whose generation loop does not react to its own failure exits after this
READS_PER_S = 2000.0  # the board's reads a second, all ranks together (poll_s = world / READS_PER_S)
MESSAGES_PER_S = 250.0  # messages to rank 0 a second, all ranks together (flush_s = world / MESSAGES_PER_S)
GOODBYE_WAIT_S = 10.0  # at the end, how long rank 0 waits for every rank to have read the end
LEAVE_WAIT_S = 5.0  # a rank leaving on its own error waits this long at most for the others to read why
LEAVE_GRACE_S = 1.0  # ... then this long for them to say it (torchrun stops them once this rank has exited)
HEARTBEAT_S = 5.0  # every rank sends a heartbeat this often (or every 4 flushes): rank 0's live status
DONE = 1  # a message's flag: the sender's last
RESUME = "rerun with the same output_dir (or torchrun --max-restarts) to resume"

Handler = Callable[[List[Message]], int]


class ControlPlane(threading.Thread):
    """Streams each rank's outbox to rank 0's handler; keeps the outbox's view of the peers; ends when all are done."""

    def __init__(self, group: Union["Group", "LocalGroup"], outbox: Outbox, peers: Peers, handler: Optional[Handler],
                 batch_timeout: float = 600.0, tick_s: float = 0.2) -> None:
        """handler: rank 0's (it receives every rank's messages, returns how many batches it newly committed);
        None on the other ranks. The board is the outbox's."""
        super().__init__(name="spmd_dp-control", daemon=True)
        self.root = group.is_rank0
        assert (handler is not None) == self.root, "rank 0, and only rank 0, handles the messages"
        assert outbox.board is not None, "the control plane reads and writes the board"
        self.group, self.outbox, self.peers, self.handler, self.board = group, outbox, peers, handler, outbox.board
        self.tick_s = tick_s
        self.inbox: "queue.Queue[Message]" = queue.Queue()  # rank 0: the other ranks' messages
        self.poll_s = max(tick_s, group.world / READS_PER_S)
        # how long a rank holds finished batches before it sends them (rank 0: before it commits what it holds)
        self.flush_s = self.poll_s if self.root else max(tick_s, group.world / MESSAGES_PER_S)
        self.stuck_s = batch_timeout + STUCK_GRACE_S
        self.heartbeat_s = max(HEARTBEAT_S, 4 * self.flush_s)  # (most ride with a flush: at most 1/4 of rank 0's messages)
        self.all_done = threading.Event()
        self.peers_done: Set[int] = set()  # rank 0: the ranks whose last message came
        self.peer = (group.rank + 1) % group.world  # the rank this one watches
        self.ending = False  # the end is agreed: a peer that goes now is no loss
        self.drain_said = False
        self.heard = False  # this rank stops on a lost line (another's, or its own: leaving)
        # what this thread did, for the metrics (docs/scale.md)
        self.stats = {"messages": 0, "handler_calls": 0, "handler_s": 0.0, "board_reads": 0, "control_cpu_s": 0.0,
                      "receive_cpu_s": 0.0, "poll_s": self.poll_s}

    # -- the thread ------------------------------------------------------------------------------------
    def run(self) -> None:
        box, me, world, root = self.outbox, self.group.rank, self.group.world, self.root
        try:
            if world > 1:
                threading.Thread(target=self._watch_peer, name="spmd_dp-watch", daemon=True).start()
                if root:
                    threading.Thread(target=self._receive, name="spmd_dp-receive", daemon=True).start()
            sent_done, next_read, next_flush, next_beat = False, 0.0, 0.0, 0.0
            pending: List[Message] = []  # held until the next flush: one message (one journal line) for many batches
            while True:
                finished = box.finished  # read before draining: everything put before it is drained now
                peers_done = len(self.peers_done)
                items = self._drain()
                for m in items:
                    if isinstance(m, RankStats) and m.rank == me:  # its last message: what this thread cost
                        m.control_cpu_s = round(time.thread_time(), 4)
                        m.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
                done = finished and box.queue.empty()
                pending += items
                now = time.monotonic()
                if now >= next_beat and not done:
                    pending.append(self._beat(now))
                    next_beat = now + self.heartbeat_s
                if done or now >= next_flush or sum(m.nbytes for m in pending) >= MAX_MESSAGE_BYTES:
                    next_flush = now + self.flush_s
                    if root:
                        self._commit(pending)
                    elif pending or (done and not sent_done):
                        self.group.send_message(encode(pending) if pending else b"", DONE if done else 0)
                        self.stats["messages"] += 1
                        sent_done = done
                    pending = []
                self._say_drain()
                if now >= next_read:
                    view = self._read()
                    next_read = now + self.poll_s
                    if root and done and peers_done == world - 1 and self.inbox.empty():
                        self.board.end()
                        break
                    if not root and sent_done and view.end:
                        self.board.left()
                        break
                self._check_heartbeat()
            self.ending = True
            if world > 1:
                self._goodbye()
        except BaseException as e:  # handed to the generation loop, which fails the rank
            if self.peers.error is None:
                self.peers.error = e if isinstance(e, RunFailure) else self._failed(e)
        finally:
            self.stats["control_cpu_s"] = time.thread_time()
            self.all_done.set()
        self._exit_if_stuck()

    def _beat(self, now: float) -> RankEvent:
        """This rank's heartbeat for rank 0: how long ago its generation loop last went round (-1: not in it); the
        first names its host."""
        beat, first = self.outbox.heartbeat, not self.stats.get("beats")
        self.stats["beats"] = self.stats.get("beats", 0) + 1
        return RankEvent(self.group.rank, BEAT, round(time.time(), 3), value=round(now - beat, 1) if beat else -1.0,
                         host=socket.gethostname() if first else "")

    def _failed(self, error: BaseException) -> RunFailure:
        """An error in this thread: a send to rank 0 that failed (rank 0 is gone), the store gone, ..."""
        if not self.root:
            return PeerLost(f"rank {self.group.rank} stops: {self._lost_line(error, 0)}; {RESUME}")
        text = str(error).strip()
        return RunFailure(f"rank 0's control plane failed: {type(error).__name__}: "
                          f"{text.splitlines()[0][:300] if text else ''}; what was committed is kept: {RESUME}")

    def _drain(self) -> List[Message]:
        """What waits in the outbox (rank 0: and in its inbox), up to MAX_MESSAGE_BYTES; waits a tick for the first."""
        items: List[Message] = []
        size = 0
        first = self.inbox if self.root else self.outbox.queue  # rank 0 mostly hears from the others
        for q, wait in ((first, self.tick_s), (self.outbox.queue, 0.0)) if self.root else ((first, self.tick_s),):
            try:
                if wait:
                    items.append(q.get(timeout=wait))
                    size += items[-1].nbytes
                while size < MAX_MESSAGE_BYTES:
                    items.append(q.get_nowait())
                    size += items[-1].nbytes
            except queue.Empty:
                pass
        return items

    def _commit(self, items: List[Message]) -> None:
        """Rank 0: what arrived from every rank and its own, in one call of the handler (one journal line)."""
        if not items:
            return
        t0 = time.perf_counter()
        committed = self.handler(items)
        self.stats["handler_s"] += time.perf_counter() - t0
        self.stats["handler_calls"] += 1
        self.board.committed(committed)

    def _receive(self) -> None:
        """Rank 0's receiving thread: every other rank's messages into rank 0's inbox, in arrival order."""
        src = None
        try:
            while len(self.peers_done) < self.group.world - 1:
                src, data, flags = self.group.recv_message()
                for m in decode(data) if data else []:
                    self.inbox.put(m)
                self.stats["messages"] += 1
                if flags & DONE:
                    self.peers_done.add(src)
        except BaseException as e:
            if self.peers.error is None and not self.ending:
                self.peers.error = PeerLost(f"rank 0 stops: {self._lost_line(e, src)}; {RESUME}")
        finally:
            self.stats["receive_cpu_s"] = time.thread_time()

    def _read(self) -> View:
        view = self.board.read()
        self.stats["board_reads"] += 1
        self.peers.view = view
        if view.lost:
            self._heard()  # the rank that left waits for every rank to have read it (leaving)
            raise PeerLost(f"rank {self.group.rank} stops: {view.lost[0]}; {RESUME}")
        drain = self.peers.drain
        if view.drains and not drain.requested:
            signum, rank = view.drains[0]
            drain.request(signum, f"{signal.Signals(signum).name} on rank {rank}")
        return view

    def _say_drain(self) -> None:
        """This rank got a signal: every rank drains, at its next read of the board."""
        drain = self.peers.drain
        if drain.requested and not self.drain_said:
            self.drain_said = True
            if " on rank " not in (drain.why or ""):
                self.board.drain(drain.signum)

    # -- peers that leave ------------------------------------------------------------------------------
    def _watch_peer(self) -> None:
        """Wait for the next rank's goodbye; if its process goes first, name it on the board."""
        try:
            self.group.hello((self.group.rank - 1) % self.group.world, self.peer)
            self.group.watch(self.peer)
        except BaseException as e:
            if self.ending:
                return
            line = self._lost_line(e, self.peer)
            try:
                self.board.lost(line)
            except Exception as store_error:  # without torchrun the store lives in rank 0's process
                logger.debug("could not name rank %d on the board: %s", self.peer, store_error)
            if self.peers.error is None:
                self.peers.error = PeerLost(f"rank {self.group.rank} stops: {line}; {RESUME}")

    def _lost_line(self, error: BaseException, peer: Optional[int]) -> str:
        """'rank P exited: <its reason>' from its note in the store, or 'rank P left without a word'."""
        if peer is None:
            text = str(error).strip()
            return f"the control plane failed ({text.splitlines()[0][:200] if text else type(error).__name__})"
        if self.ending:
            return f"rank {peer} left at the end"
        try:
            note = self.board.note(peer)
        except Exception:  # without torchrun rank 0 hosts the store: it is gone with it
            return f"rank {peer} is gone (rank 0 hosts the store without torchrun: see rank 0's line)"
        if note is not None:
            return f"rank {peer} exited: {note}"
        return (f"rank {peer} left without a word (killed? out of memory? see torchrun's summary or its log)")

    def _goodbye(self) -> None:
        """The end is agreed: tell the rank that watches this one, then wait (bounded) until every rank has read the
        end, and leave together (Board.wait_released)."""
        try:
            self.group.goodbye((self.group.rank - 1) % self.group.world, timedelta(seconds=GOODBYE_WAIT_S))
        except Exception as e:  # it may have left already
            logger.debug("goodbye to rank %d: %s", (self.group.rank - 1) % self.group.world, e)
        try:
            self.board.wait_released(timedelta(seconds=GOODBYE_WAIT_S + self.poll_s))
        except Exception as e:  # a rank gone at the end: leave anyway, bounded
            logger.debug("not every rank read the end within %.0f s: %s", GOODBYE_WAIT_S + self.poll_s, e)

    def leaving(self, error: BaseException) -> None:
        """This rank leaves the run on an error of its own: say why, for the others to report (best effort,
        bounded). Not for a peer's exit, a drain or bad input (every rank has those). The line goes on the board
        at once, and this rank waits (LEAVE_WAIT_S) until every other one has read it, then LEAVE_GRACE_S: once
        it exits, torchrun stops the others, and they should have said their line by then. Not after Ctrl-C: a
        second one means now."""
        if isinstance(error, (PeerLost, Drained, UsageError)):
            return
        text = str(error).strip()
        reason = text.splitlines()[0] if text else ""
        if not isinstance(error, RunFailure):
            reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        try:
            self.board.leave_note(reason)
            if self.group.world > 1 and not self.ending and not isinstance(error, KeyboardInterrupt):
                self._heard()  # (every rank may be leaving at once: each counts itself)
                self.board.lost(f"rank {self.group.rank} exited: {reason}")
                if self.board.wait_heard(timedelta(seconds=LEAVE_WAIT_S)):
                    time.sleep(LEAVE_GRACE_S)
        except Exception as e:  # the store may be gone with rank 0
            logger.debug("could not leave a note in the store: %s", e)

    def _heard(self) -> None:
        if not self.heard:
            self.heard = True
            self.board.heard()

    # -- this rank stuck -------------------------------------------------------------------------------
    def _check_heartbeat(self) -> None:
        beat = self.outbox.heartbeat
        if beat is not None and time.monotonic() - beat > self.stuck_s and self.peers.error is None:
            self.peers.error = RunFailure(
                f"rank {self.group.rank}: the generation loop has not gone round for {self.stuck_s:g}s (engine steps "
                f"are bounded by batch_timeout: something else is stuck); what was committed is kept: rerun with "
                f"the same output_dir to resume")
            raise self.peers.error

    def _exit_if_stuck(self) -> None:
        """The generation loop picks up the error at its next step; if it is stuck, end the process."""
        error = self.peers.error
        if not isinstance(error, RunFailure) or self.outbox.finished:
            return
        if not self.peers.acknowledged.wait(STUCK_GRACE_S) and threading.main_thread().is_alive():
            self.leaving(error)
            print(f"spmd_dp: error: {error} (the generation loop did not return; exiting)", file=sys.stderr,
                  flush=True)
            terminate_children()
            os._exit(1)

    def wait_done(self) -> None:
        """Wait for the end agreed by all ranks. Bounded: every send and read is, and a lost peer is seen."""
        while not self.all_done.wait(1.0):
            if not self.is_alive():
                break
        self.peers.check()
