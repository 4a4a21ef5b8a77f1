"""The work: records cut into batches, and who takes which batch.

A batch is `batch_size` contiguous slots of the record order (spmd_dp/inputs/order.py: input positions,
or records grouped by prompt prefix), the unit of scheduling, commit and resume. Only slots not yet
committed (the `pending` spans) are cut. With prefix affinity the cuts fall where neighbours share least
(spmd_dp/control/groups.py): static's shares end there, and dynamic claims runs of batches that keep a
group on one rank (a rank takes the rest of its run, `local`, before claiming more).

- `schedule=static`: the seed's balanced contiguous split of the pending records
  over the ranks (33 over 4 -> 9,8,8,8), each rank's share cut into batches.
- `schedule=dynamic`: the pending records cut into batches that ranks claim at run
  time from an atomic counter in the rendezvous store, so a fast rank takes more.

Either way the batches form one global list (batch Y of the logs is its index),
claimed through counters in the store (`Claims`): static keeps one queue per rank
and lets the others take the queue of a rank whose engine failed to start or gave
up. This module is the only place that tells the two schedules apart at run time.

How much a rank holds (`Claims.target`, in requests; spmd_dp/generation.py claims while it
holds fewer): enough to keep its engine full (its capacity + one batch) while the unclaimed work
is large; then guided self-scheduling: about remaining / (TAIL_K x N), so the last batches spread
over the ranks instead of waiting in one rank's queue. Until every rank has reported its engine
(ready or failed), a rank holds at most (ranks reported / N) of its capacity: the first engine up
does not take an engine-full of the first (in a sorted input, the longest) records alone. static:
a rank's share is its own; it holds an engine-full.

Returned work: a rank whose engine fails for good (or stalls) hands its claimed,
unfinished batches back (`give_back`): each goes into a slot of a list in the store,
and every rank takes returned batches before new work, a slot being won by the one
rank whose `store.add` on it returns 1 (the same atomic discipline as the counters).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections import deque
from itertools import accumulate, groupby
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from spmd_dp.control import groups
from spmd_dp.control.messages import RankState
from spmd_dp.log import logger

Span = Tuple[int, int]  # [start, stop) of record positions
TAIL_K = 2  # guided self-scheduling: in the tail a rank holds about (unclaimed records) / (TAIL_K x ranks)


@dataclass(frozen=True)
class Batch:
    index: int  # position in this run's batch list: "batch Y" in the logs
    start: int  # first slot of the record order (spmd_dp/inputs/order.py; input order: the record's position)
    stop: int
    owner: int = -1  # static: the rank whose share it is; dynamic: -1
    run: int = -1  # dynamic: the claim unit it belongs to (batches of one run are claimed together)

    @property
    def size(self) -> int:
        return self.stop - self.start


def balanced_split(n: int, world: int) -> List[Span]:
    """The seed's split: rank r starts at r*floor + min(r, remainder)."""
    if world < 1 or n < 0:
        raise ValueError(f"balanced_split(n={n}, world={world})")
    floor, rem = divmod(n, world)
    spans = []
    for r in range(world):
        start = r * floor + min(r, rem)
        spans.append((start, start + floor + (1 if r < rem else 0)))
    return spans


def pending_spans(n: int, committed: Iterable[Span]) -> List[Span]:
    """The parts of [0, n) not covered by the committed spans."""
    out, pos = [], 0
    for start, stop in sorted(committed):
        if start > pos:
            out.append((pos, min(start, n)))
        pos = max(pos, stop)
    if pos < n:
        out.append((pos, n))
    return [s for s in out if s[0] < s[1]]


def cut(spans: Sequence[Span], batch_size: int) -> List[Span]:
    """Cut spans into pieces of at most batch_size records; no piece crosses a gap."""
    out = []
    for start, stop in spans:
        for s in range(start, stop, batch_size):
            out.append((s, min(s + batch_size, stop)))
    return out


def static_batches(pending: Sequence[Span], world: int, batch_size: int, sharing=None) -> List[Batch]:
    """Each rank's share cut into batches; sharing (prefix affinity): the shares end where neighbours share least."""
    total = sum(stop - start for start, stop in pending)
    if sharing is None:
        shares = balanced_split(total, world)
    else:
        ends = groups.static_bounds(groups.costs(pending, sharing), world)
        shares = list(zip([0] + ends[:-1], ends))
    batches: List[Batch] = []
    for rank, (lo, hi) in enumerate(shares):
        for start, stop in cut(groups.take(pending, lo, hi - lo), batch_size):
            batches.append(Batch(len(batches), start, stop, owner=rank))
    return batches


def dynamic_batches(pending: Sequence[Span], batch_size: int, world: int = 1, sharing=None) -> List[Batch]:
    """The batches in claim order; sharing (prefix affinity): batches of one run (spmd_dp/control/groups.py) are
    claimed together. Without, each batch is a run of its own."""
    if sharing is None:
        return [Batch(i, start, stop, run=i) for i, (start, stop) in enumerate(cut(pending, batch_size))]
    batches: List[Batch] = []
    lo = 0
    for run, hi in enumerate(groups.run_bounds(groups.costs(pending, sharing), batch_size, world, TAIL_K)):
        for start, stop in cut(groups.take(pending, lo, hi - lo), batch_size):
            batches.append(Batch(len(batches), start, stop, run=run))
        lo = hi
    return batches


def make_batches(schedule: str, pending: Sequence[Span], world: int, batch_size: int, sharing=None) -> List[Batch]:
    """sharing: the record order's (spmd_dp/inputs/order.py), None without grouping."""
    if schedule == "static":
        return static_batches(pending, world, batch_size, sharing)
    return dynamic_batches(pending, batch_size, world, sharing)


class Claims:
    """This rank's claims on the run's batches, through atomic counters in a c10d Store (`store.add`).

    dynamic: one queue over all batches, claimed in order by whichever rank asks.
    static: one queue per rank (its share); a rank also takes what remains of the
    queues of ranks whose engines failed to start or gave up.
    Either way, batches handed back by a rank come first.
    """

    def __init__(self, store, batches: Sequence[Batch], schedule: str, rank: int, world: int) -> None:
        self.store, self.rank, self.world, self.static = store, rank, world, schedule == "static"
        self.batches = list(batches)
        if self.static:
            self.queues = {r: [[b] for b in batches if b.owner == r] for r in range(world)}
        else:  # one queue of runs: a rank claims a run, then takes its batches one by one (`local`)
            self.queues = {-1: [list(run) for _, run in groupby(batches, key=lambda b: b.run)]}
        sizes = [sum(b.size for b in run) for run in self.queues.get(-1, [])]
        # dynamic: records in the runs after run i ([i+1:]); unclaimed = after[the counter's last value]
        self.after = list(accumulate(reversed(sizes)))[::-1][1:] + [0] if sizes else [0]
        self.unclaimed = sum(b.size for b in batches)  # as of this rank's last claim (it only falls)
        self.local: "deque[Batch]" = deque()  # the rest of the run this rank claimed last
        self.exhausted: set = set()
        self.returned_seen = 0  # returned slots below this one are taken, or this rank's own (own_returned)
        self.own_returned: set = set()
        if self.static:  # the seed's `Assigned N prompts to rank X` for a static share (dynamic logs each claim)
            logger.info("Assigned %d prompts to rank %d", self.share(self.rank), self.rank)

    def give_back(self, batches: Sequence[Batch]) -> List[Batch]:
        """Hand claimed, unfinished batches back, and the rest of this rank's run: the other ranks take them before
        new work. Returns every batch handed back."""
        batches = list(batches) + list(self.local)
        self.local.clear()
        for b in batches:
            slot = self.store.add("returned/n", 1) - 1
            self.store.set(f"returned/{slot}", f"{b.index} {self.rank}")
        return batches

    def _claim_returned(self, out: Mapping[int, RankState], returned: Optional[int]) -> Optional[Batch]:
        """A batch some rank handed back, if any is left. A rank leaves the batches it handed back itself
        to the others (they may be why its engine stalled), unless no other rank takes work any more.
        returned: how many were handed back as of the board's last read (None: ask the store)."""
        n = self.store.add("returned/n", 0) if returned is None else returned
        if n <= self.returned_seen and not self.own_returned:
            return None
        alone = len([r for r in out if r != self.rank]) == self.world - 1
        for slot in list(self.own_returned) + list(range(self.returned_seen, n)):
            self.returned_seen = max(self.returned_seen, slot + 1)
            index, giver = (int(x) for x in self.store.get(f"returned/{slot}").split())
            if giver == self.rank and not alone:
                self.own_returned.add(slot)
                continue
            self.own_returned.discard(slot)
            if self.store.add(f"returned/{slot}/taken", 1) == 1:  # this rank won the slot
                batch = self.batches[index]
                logger.info("Assigned %d prompts to rank %d (batch %d, handed back by rank %d)", batch.size,
                            self.rank, batch.index, giver)
                return batch
        return None

    def _claim_from(self, owner: int) -> Optional[Batch]:
        """The first batch of the next run of a queue (the rest go to `local`), or None."""
        queue = self.queues.get(owner, [])
        if owner in self.exhausted or not queue:
            return None
        i = self.store.add(f"next/{owner}", 1) - 1
        if owner == -1:
            self.unclaimed = self.after[i] if i < len(queue) else 0
        if i < len(queue):
            self.local.extend(queue[i][1:])
            return queue[i][0]
        self.exhausted.add(owner)
        return None

    def target(self, capacity: int, batch_size: int, reported: int) -> int:
        """Requests this rank keeps claimed and unfinished. capacity: its engine's (vLLM's max_num_seqs);
        reported: the ranks whose engines have started or failed (this one's included)."""
        full = capacity + batch_size
        if self.static or self.world == 1 or self.local:  # (the rest of a run is this rank's alone)
            return full
        if reported < self.world:  # the first engines up share the first records with those still starting
            full = min(full, max(1, capacity * reported // self.world))
        return min(full, max(1, -(-self.unclaimed // (TAIL_K * self.world))))

    def next(self, out: Union[Mapping[int, RankState], Sequence[RankState]] = (),
             returned: Optional[int] = None) -> Optional[Batch]:
        """The next batch this rank runs, or None when there is none for it now (more may come back).
        out: the ranks that take no work (or every rank's state); returned: batches handed back so far."""
        if not isinstance(out, Mapping):
            out = {r: s for r, s in enumerate(out) if s.out}
        batch = self._claim_returned(out, returned)
        if batch is not None:
            return batch
        if not self.static:
            batch = self.local.popleft() if self.local else self._claim_from(-1)
            if batch is not None:
                logger.info("Assigned %d prompts to rank %d (batch %d)", batch.size, self.rank, batch.index)
            return batch
        batch = self._claim_from(self.rank)
        for other in sorted(out):
            if batch is not None:
                break
            if other != self.rank:
                batch = self._claim_from(other)
                if batch is not None:
                    logger.info("Assigned %d prompts to rank %d (batch %d of failed rank %d)", batch.size,
                                self.rank, batch.index, other)
        return batch

    def share(self, rank: int) -> int:
        """Records in a rank's static share (0 under dynamic)."""
        return sum(b.size for run in self.queues.get(rank, []) for b in run) if self.static else 0
