"""The generation loop's outbox (spmd_dp/control/outbox.py): what it finishes goes out in order, its engine state
and idle flag reach the board as they change (a rank that is out is idle for good), its heartbeat."""

import time

import torch.distributed as dist

from spmd_dp.control.board import Board
from spmd_dp.control.messages import BatchDone, RankState, RankStats
from spmd_dp.control.outbox import Outbox


def shared(world=2):
    """Outboxes of `world` ranks over one board, and rank 0's board to read it with."""
    store = dist.HashStore()
    b0 = Board(store, 0, world, is_rank0=True)
    return [Outbox(b0)] + [Outbox(Board(store, r, world, is_rank0=False)) for r in range(1, world)], b0


def test_messages_go_out_in_order():
    box = Outbox()
    sent = [BatchDone(0, 0, 2, 0, ["a", "b"]), BatchDone(1, 2, 4, 0, ["c", "d"]), RankStats(0, records=4)]
    for m in sent:
        box.put(m)
    assert [box.queue.get_nowait() for _ in sent] == sent and box.queue.empty()


def test_state_and_idle_reach_the_board_as_they_change():
    (o0, o1), board = shared()
    assert o0.state is RankState.STARTING and board.read().reported == 0
    o0.state = RankState.READY
    o1.state = RankState.READY
    assert board.read().reported == 2 and board.read().idle == 0
    o1.idle = True  # no batch left to it
    assert board.read().idle == 1
    o1.idle = False  # before a claim: said at once, so no rank sees every rank idle while it claims
    assert board.read().idle == 0


def test_a_rank_that_is_out_is_idle_for_good():
    (o0, o1), board = shared()
    o1.state = RankState.READY
    o1.state = RankState.GAVE_UP
    v = board.read()
    assert v.out == {1: RankState.GAVE_UP} and v.idle == 1 and o1.idle
    o1.idle = False  # the loop cannot take it back in
    assert o1.idle and board.read().idle == 1


def test_without_a_board_the_flags_are_its_own():
    box = Outbox()
    box.state = RankState.FAILED
    assert box.idle and box.board is None


def test_heartbeat_and_finish():
    box = Outbox()
    assert box.heartbeat is None and not box.finished
    t0 = time.monotonic()
    box.beat()
    assert t0 <= box.heartbeat <= time.monotonic()
    box.finish()  # out of the loop: nothing to watch any more, the control thread may end
    assert box.heartbeat is None and box.finished
