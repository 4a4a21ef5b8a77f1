"""The split of records into shares and batches, and claiming batches through a real c10d store (HashStore):
each batch once, returned batches first, a static share of a rank that is out taken by the others."""

import itertools

import pytest
import torch.distributed as dist

from spmd_dp.control.claims import Claims, balanced_split, cut, dynamic_batches, make_batches, pending_spans, static_batches
from spmd_dp.control.messages import RankState


def test_seed_split_33_over_4():
    assert [b - a for a, b in balanced_split(33, 4)] == [9, 8, 8, 8]
    assert balanced_split(33, 4) == [(0, 9), (9, 17), (17, 25), (25, 33)]


@pytest.mark.parametrize("n,world", list(itertools.product([0, 1, 2, 3, 7, 31, 32, 33, 100, 1001], [1, 2, 3, 4, 8, 13])))
def test_balanced_split_covers_once_and_is_balanced(n, world):
    spans = balanced_split(n, world)
    assert len(spans) == world
    covered = [i for a, b in spans for i in range(a, b)]
    assert covered == list(range(n))  # contiguous, in order, no overlap, nothing missing
    sizes = [b - a for a, b in spans]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first `remainder` ranks take one more


def test_fewer_records_than_ranks_leaves_ranks_empty():
    assert [b - a for a, b in balanced_split(2, 4)] == [1, 1, 0, 0]
    assert [(b.start, b.stop) for b in static_batches([(0, 2)], 4, 32)] == [(0, 1), (1, 2)]
    owners = [b.owner for b in static_batches([(0, 2)], 4, 32)]
    assert owners == [0, 1]


def test_pending_spans():
    assert pending_spans(10, []) == [(0, 10)]
    assert pending_spans(10, [(0, 10)]) == []
    assert pending_spans(10, [(2, 4), (6, 7)]) == [(0, 2), (4, 6), (7, 10)]
    assert pending_spans(10, [(6, 7), (0, 3), (3, 5)]) == [(5, 6), (7, 10)]
    assert pending_spans(0, []) == []


def test_cut_never_crosses_gaps():
    assert cut([(0, 5), (7, 12)], 3) == [(0, 3), (3, 5), (7, 10), (10, 12)]


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
@pytest.mark.parametrize("world,bs", [(1, 32), (2, 4), (4, 3), (5, 100)])
def test_batches_cover_pending_exactly(schedule, world, bs):
    pending = [(0, 9), (12, 40), (41, 77)]
    batches = make_batches(schedule, pending, world, bs)
    covered = sorted(i for b in batches for i in range(b.start, b.stop))
    assert covered == [i for a, b in pending for i in range(a, b)]
    assert all(1 <= b.size <= bs for b in batches)
    assert [b.index for b in batches] == list(range(len(batches)))


def test_static_shares_follow_the_seed_split():
    batches = static_batches([(0, 33)], 4, 32)
    share = {r: sum(b.size for b in batches if b.owner == r) for r in range(4)}
    assert share == {0: 9, 1: 8, 2: 8, 3: 8}
    assert dynamic_batches([(0, 70)], 32)[-1].size == 6


def _store():
    return dist.HashStore()


def test_dynamic_queue_hands_each_batch_out_once():
    store = _store()
    batches = dynamic_batches([(0, 100)], 8)
    queues = [Claims(store, batches, "dynamic", r, 3) for r in range(3)]
    got = []
    for i in itertools.count():
        b = queues[i % 3].next()
        if b is None and all(q.next() is None for q in queues):
            break
        if b is not None:
            got.append(b.index)
    assert sorted(got) == list(range(len(batches)))


def test_static_queue_takes_own_share_then_failed_ranks_share():
    store = _store()
    batches = static_batches([(0, 40)], 4, 5)
    q1 = Claims(store, batches, "static", 1, 4)
    ready = [RankState.READY] * 4
    own = [q1.next(ready) for _ in range(2)]
    assert all(b.owner == 1 for b in own) and q1.next(ready) is None
    rank3_failed = [RankState.READY] * 3 + [RankState.FAILED]
    stolen = []
    while (b := q1.next(rank3_failed)) is not None:
        stolen.append(b)
    assert {b.owner for b in stolen} == {3} and sum(b.size for b in stolen) == 10
    q3 = Claims(store, batches, "static", 3, 4)
    assert q3.next(ready) is None  # rank 3's queue was taken by rank 1


def test_the_claim_target_shrinks_with_the_work_left_and_waits_for_the_engines():
    """Requests a rank keeps in flight: an engine-full and a batch while much is unclaimed; about unclaimed /
    (TAIL_K x N) in the tail; (ranks reported / N) of the engine's capacity while engines still start."""
    from spmd_dp.control.claims import TAIL_K

    store = _store()
    batches = dynamic_batches([(0, 4000)], 8)  # 500 batches
    c = Claims(store, batches, "dynamic", 0, 4)
    full = 64 + 8
    assert c.target(64, 8, reported=4) == full  # 4000 unclaimed: far from the tail
    assert c.target(64, 8, reported=1) == 64 // 4  # the first engine up: a quarter of its capacity
    assert c.target(64, 8, reported=2) == 64 // 2
    store.add("next/-1", 480)  # the other ranks claimed 480 batches: 20 left, 160 records
    assert c.next().index == 480 and c.unclaimed == 152
    assert c.target(64, 8, reported=4) == -(-152 // (TAIL_K * 4)) == 19
    while c.next() is not None:
        pass
    assert c.unclaimed == 0 and c.target(64, 8, reported=4) == 1  # nothing unclaimed: finish what is held
    assert Claims(store, batches, "static", 0, 4).target(64, 8, reported=1) == full  # static: its own share
    assert Claims(_store(), batches, "dynamic", 0, 1).target(64, 8, reported=1) == full  # alone: nothing to share


READY3 = [RankState.READY] * 3


def test_returned_batches_are_taken_once_before_new_work():
    store = dist.HashStore()
    batches = dynamic_batches([(0, 40)], 4)  # 10 batches
    r0, r1, r2 = (Claims(store, batches, "dynamic", r, 3) for r in range(3))
    mine = [r1.next(READY3) for _ in range(3)]
    assert [b.index for b in mine] == [0, 1, 2]
    r1.give_back(mine[1:])
    assert r1.next(READY3).index == 3  # the giver leaves its own returned batches to the others
    assert [r0.next(READY3).index, r2.next(READY3).index] == [1, 2]  # returned first, each once
    assert r0.next(READY3).index == 4  # then new work
    r2.give_back([batches[2]])  # rank 2 hands back what it took: rank 1 may take that one
    assert r1.next(READY3).index == 2
    assert r0.next(READY3).index == 5


def test_a_rank_takes_its_own_returned_batch_only_when_alone():
    store = dist.HashStore()
    batches = dynamic_batches([(0, 8)], 4)
    r0, r1 = Claims(store, batches, "dynamic", 0, 2), Claims(store, batches, "dynamic", 1, 2)
    b = r1.next([RankState.READY] * 2)
    r1.give_back([b])
    assert r1.next([RankState.READY] * 2).index == 1  # new work, its own returned batch left for rank 0
    assert r1.next([RankState.READY] * 2) is None
    assert r1.next([RankState.GAVE_UP, RankState.READY]).index == 0  # rank 0 is out: rank 1 takes it back
    assert r0.next([RankState.READY] * 2) is None


def test_static_share_of_a_rank_that_gave_up_goes_to_the_others():
    store = dist.HashStore()
    batches = static_batches([(0, 30)], 3, 5)
    r0, r1 = Claims(store, batches, "static", 0, 3), Claims(store, batches, "static", 1, 3)
    first = r1.next(READY3)
    r1.give_back([first])
    out = [RankState.READY, RankState.GAVE_UP, RankState.READY]
    got = []
    while (b := r0.next(out)) is not None:
        got.append(b.index)
    assert sorted(got) == [0, 1, 2, 3]  # its own two, rank 1's returned batch 2 (first) and the rest of its share
    assert got[0] == 2  # returned work first
