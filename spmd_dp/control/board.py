"""The run's status board: a few counters in the rendezvous store, read by every rank in one round trip.

What the ranks must know about each other, kept where no collective over all ranks is needed
(its cost grew with their number: spmd_dp/control/plane.py, docs/scale.md):

  reported    ranks whose engines have started or failed    Claims.target: the start-up cap
  out/n       ranks that take no work (their engine failed to start, or they gave up mid-run);
              out/<i> = "<rank> <state>"                       static shares to take over; all out
  idle        ranks with no batch (idle, or out)               GenerationLoop: nothing left anywhere
  committed   batches rank 0 has committed                     GenerationLoop: the end of the work
  returned/n  batches handed back (spmd_dp/control/claims.py)         idle ranks look for them when it grows
  drain/n     drain/<i> = "<signal> <rank>"                    a drain reaches every rank
  lost/n      lost/<i> = the line naming a rank that left      every rank stops with that line
  heard       ranks stopping on a lost line (or leaving)       the last sets `all_heard`: the leaving rank waits
  end         1 once rank 0 has every rank's last message      the end agreement
  left        ranks that have read the end                     the last sets `released`: every rank leaves then

A rank changes a counter when its own state changes (a store.add each, a handful in a run), rank 0
adds what it commits once per round of messages, and every rank reads the whole board every
`poll_s` (one multi_get): the store serves world / poll_s reads a second, whatever the work.
No torch here: the store is duck-typed (`add`, `set`, `get`, `multi_get`, `wait`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

from spmd_dp.control.messages import RankState

KEYS = ("reported", "out/n", "idle", "committed", "returned/n", "drain/n", "lost/n", "end", "left")


@dataclass
class View:
    """The board as of the last read."""

    reported: int = 0
    out: Dict[int, RankState] = field(default_factory=dict)
    idle: int = 0
    committed: int = 0
    returned: int = 0
    drains: List[Tuple[int, int]] = field(default_factory=list)  # (signal, rank)
    lost: List[str] = field(default_factory=list)
    end: bool = False
    left: int = 0
    reads: int = 0


class Board:
    def __init__(self, store, rank: int, world: int, is_rank0: bool) -> None:
        """Rank 0 creates the counters; the others wait for them (bounded by the store's timeout)."""
        self.store, self.rank, self.world = store, rank, world
        if is_rank0:
            for key in KEYS:
                store.add(key, 0)
        else:
            store.wait(list(KEYS))
        self.view = View()
        self._reported = self._out = self._idle = False

    def read(self) -> View:
        counts = dict(zip(KEYS, (int(v) for v in self.store.multi_get(list(KEYS)))))
        v = self.view
        for i in range(len(v.out), counts["out/n"]):
            rank, state = self.store.get(f"out/{i}").split()
            v.out[int(rank)] = RankState(int(state))
        for i in range(len(v.drains), counts["drain/n"]):
            signum, rank = self.store.get(f"drain/{i}").split()
            v.drains.append((int(signum), int(rank)))
        v.lost += [self.store.get(f"lost/{i}").decode() for i in range(len(v.lost), counts["lost/n"])]
        v.reported, v.idle, v.committed = counts["reported"], counts["idle"], counts["committed"]
        v.returned, v.end, v.left = counts["returned/n"], counts["end"] > 0, counts["left"]
        v.reads += 1
        return replace(v, out=dict(v.out), drains=list(v.drains), lost=list(v.lost))  # a copy others may keep

    # -- this rank's changes ----------------------------------------------------------------------
    def report(self, state: RankState) -> None:
        """This rank's engine state (STARTING -> READY | FAILED; READY -> GAVE_UP)."""
        if state != RankState.STARTING and not self._reported:
            self._reported = True
            self.store.add("reported", 1)
        if state.out and not self._out:
            self._out = True
            i = self.store.add("out/n", 1) - 1
            self.store.set(f"out/{i}", f"{self.rank} {int(state)}")

    def set_idle(self, idle: bool) -> None:
        if idle != self._idle:
            self._idle = idle
            self.store.add("idle", 1 if idle else -1)

    def drain(self, signum: int) -> None:
        i = self.store.add("drain/n", 1) - 1
        self.store.set(f"drain/{i}", f"{signum} {self.rank}")

    def lost(self, line: str) -> None:
        i = self.store.add("lost/n", 1) - 1
        self.store.set(f"lost/{i}", line)

    def heard(self) -> None:
        """This rank stops on a lost line: another rank's, or its own (it leaves on an error). The last one to do so
        sets `all_heard` (as `left` sets `released`)."""
        if self.store.add("heard", 1) >= self.world:
            self.store.set("all_heard", "1")

    def wait_heard(self, timeout: timedelta) -> bool:
        """Until every rank stops on a lost line (bounded): whether they all do."""
        try:
            self.store.wait(["all_heard"], timeout)
            return True
        except Exception:  # the store's timeout (or the store gone with rank 0): leave anyway
            return False

    # -- rank 0 -----------------------------------------------------------------------------------
    def committed(self, n: int) -> None:
        if n:
            self.store.add("committed", n)

    def end(self) -> None:
        self.store.add("end", 1)

    def left(self) -> None:
        """This rank has read the end. The last one to do so releases every rank (`wait_released`)."""
        if self.store.add("left", 1) >= self.world - 1:
            self.store.set("released", "1")

    def wait_released(self, timeout) -> None:
        """Until every rank has read the end (bounded): then all leave at once, so that none that exits non-zero
        has its launcher stop the others before they said their own line (torchrun ends a job's other workers
        when one fails), and rank 0, which may host the store, goes no earlier than the rest."""
        if self.world > 1:
            self.store.wait(["released"], timeout)

    def note(self, rank: int) -> Optional[str]:
        """The reason a rank left in the store (ControlPlane.leaving), if it wrote one."""
        key = f"exit/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def leave_note(self, reason: str) -> None:
        self.store.set(f"exit/{self.rank}", reason)
