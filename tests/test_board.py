"""The run's status board (spmd_dp/control/board.py) on a real c10d store (HashStore), one Board per simulated rank:
what one rank writes, every rank reads in one round trip; each rank's change counts once however often it is said;
the end and the release; the note a rank leaves when it exits."""

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from spmd_dp.control.board import Board
from spmd_dp.control.messages import RankState


def boards(world):
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=5))
    return [Board(store, r, world, is_rank0=r == 0) for r in range(world)]  # rank 0 first: it makes the counters


def test_a_rank_waits_for_rank0s_counters_bounded():
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=0.3))
    # no rank 0 to create the board: the wait ends with the store's timeout
    with pytest.raises(dist.DistStoreError, match="timeout"):
        Board(store, 1, 2, is_rank0=False)


def test_engine_states_count_once_and_out_ranks_are_named():
    b0, b1, b2 = boards(3)
    assert b1.read().reported == 0 and b1.read().out == {}
    b0.report(RankState.STARTING)  # not reported yet
    b0.report(RankState.READY)
    b0.report(RankState.READY)  # said twice, counted once
    b1.report(RankState.FAILED)  # reported and out at once
    b2.report(RankState.READY)
    b2.report(RankState.GAVE_UP)  # already reported: only out
    b2.report(RankState.GAVE_UP)
    v = b0.read()
    assert v.reported == 3
    assert v.out == {1: RankState.FAILED, 2: RankState.GAVE_UP}
    assert b1.read().out == v.out  # every rank reads the same board


def test_idle_counts_ranks_not_calls():
    b0, b1 = boards(2)
    b0.set_idle(True)
    b0.set_idle(True)
    b1.set_idle(True)
    assert b0.read().idle == 2
    b1.set_idle(False)  # it claims again
    b1.set_idle(False)
    assert b0.read().idle == 1


def test_drains_and_lost_ranks_reach_every_rank_in_order_and_a_view_is_a_copy():
    b0, b1, b2 = boards(3)
    first = b2.read()
    b1.drain(15)
    b2.drain(10)
    b0.lost("rank 2 left without a word")
    v = b2.read()
    assert v.drains == [(15, 1), (10, 2)] and v.lost == ["rank 2 left without a word"]
    assert first.drains == [] and first.lost == []  # a view handed out earlier does not change
    v.drains.append((2, 0))
    v.out[5] = RankState.FAILED
    again = b2.read()  # nor does the board when a view is changed
    assert again.drains == [(15, 1), (10, 2)] and again.out == {} and again.reads == v.reads + 1


def test_commits_the_end_and_the_release():
    b0, b1, b2 = boards(3)
    b0.committed(0)
    b0.committed(4)
    b0.committed(3)
    assert b1.read().committed == 7 and not b1.read().end
    b0.end()
    assert b1.read().end and b2.read().end
    b1.left()
    # one rank of two still to read the end: not released (a bounded wait)
    with pytest.raises(dist.DistStoreError, match="timeout"):
        b0.wait_released(timedelta(seconds=0.2))
    b2.left()  # the last one releases every rank
    for b in (b0, b1, b2):
        b.wait_released(timedelta(seconds=1))
    assert b0.read().left == 2


def test_a_rank_alone_never_waits_for_release():
    (b0,) = boards(1)
    b0.wait_released(timedelta(seconds=0))


def test_the_note_a_rank_leaves_when_it_exits():
    b0, b1 = boards(2)
    assert b0.note(1) is None  # it left without a word
    b1.leave_note("record id='r7' (batch 3): prompt too long")
    assert b0.note(1) == "record id='r7' (batch 3): prompt too long"


def test_a_rank_that_leaves_waits_until_every_rank_stops_on_its_line():
    """ControlPlane.leaving: the leaving rank counts itself, the others count when they read its lost line; the
    wait is bounded."""
    b = boards(3)
    b[1].heard()
    b[1].lost("rank 1 exited: its reason")
    t0 = time.monotonic()
    assert not b[1].wait_heard(timedelta(seconds=0.2)) and time.monotonic() - t0 < 2  # nobody else read it: bounded
    assert b[0].read().lost == ["rank 1 exited: its reason"]
    b[0].heard()
    b[2].heard()
    assert b[1].wait_heard(timedelta(seconds=0.2))
