"""What a rank knows of the others, for its generation loop: the board as the control thread last read it, and
the control plane's error. Written by the control thread only (a new `View` each read); the loop only reads.
No torch here.
"""

from __future__ import annotations

import threading
from typing import List, Optional

from spmd_dp.control.board import View
from spmd_dp.control.drain import Drain
from spmd_dp.control.messages import RankState
from spmd_dp.control.outbox import Outbox
from spmd_dp.errors import Drained, RunFailure


class Peers:
    def __init__(self, rank: int, world: int, outbox: Outbox, drain: Optional[Drain] = None) -> None:
        """outbox: this rank's own (its engine state and idle flag count with the board's)."""
        self.rank, self.world, self.outbox = rank, world, outbox
        self.drain = drain if drain is not None else Drain(0.0)
        self.view = View()  # replaced, never changed in place
        self.error: Optional[BaseException] = None  # set by the control thread
        self.acknowledged = threading.Event()  # the loop has taken up self.error

    @property
    def shared(self) -> bool:
        """A board is read (a store exists); without one (a world of one in tests) this rank is all there is."""
        return self.outbox.board is not None

    def reported(self) -> int:
        """Ranks whose engines have started or failed (this one's as it knows it)."""
        mine = int(self.outbox.state != RankState.STARTING)
        return max(self.view.reported, mine) if self.shared else mine

    def everyone_idle(self) -> bool:
        """Every rank idle or out, as of the board's last read."""
        return (self.view.idle if self.shared else int(self.outbox.idle)) >= self.world

    @property
    def peer_states(self) -> List[RankState]:
        """Each rank's state as far as the board tells: out ranks' own; the others READY once all reported."""
        others = RankState.READY if self.reported() >= self.world else RankState.STARTING
        return [self.outbox.state if r == self.rank else self.view.out.get(r, others) for r in range(self.world)]

    def ranks_in(self, *states: RankState) -> List[int]:
        return [r for r, s in enumerate(self.peer_states) if s in states]

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

    def raise_if_stopped(self, engine_failed: Optional[str], n_batches: int, is_rank0: bool) -> None:
        """After the end agreement: no rank could generate (exit 1), or a drain stopped the run early (rank 0
        says so with the counts, in Rank0.finish)."""
        own = self.outbox.state
        out = {**self.view.out, **({self.rank: own} if own.out else {})}
        if len(out) == self.world:
            what = "start its engine" if all(s == RankState.FAILED for s in out.values()) else "keep its engine running"
            raise RunFailure(f"no rank could {what} (this rank: {engine_failed}); see the log of each rank; what "
                             f"was committed is kept: rerun with the same output_dir to resume")
        if self.drain.requested and not is_rank0 and self.view.committed < n_batches:
            raise Drained(f"stopped by {self.drain.why} after draining; rank 0's line says what was committed; "
                          f"rerun with the same output_dir to resume", self.drain.signum)
