"""What a rank knows of the others (spmd_dp/control/peers.py), from a real board (HashStore) or alone: who reported,
who is out, whether every rank is idle; the control plane's error raised in the loop's thread as one line; the end
of a run no rank could generate in, and of a drained one."""

import signal

import pytest
import torch.distributed as dist

from spmd_dp.control.board import Board
from spmd_dp.control.drain import Drain
from spmd_dp.control.messages import RankState
from spmd_dp.control.outbox import Outbox
from spmd_dp.control.peers import Peers
from spmd_dp.errors import Drained, RunFailure


def ranks(world, drain=None):
    """Each rank's Peers over one board; `read()` refreshes every rank's view, as its control thread would."""
    store = dist.HashStore()
    boards = [Board(store, r, world, is_rank0=r == 0) for r in range(world)]
    peers = [Peers(r, world, Outbox(b), drain) for r, b in enumerate(boards)]

    def read():
        for p, b in zip(peers, boards):
            p.view = b.read()
    return peers, read


def test_states_as_the_board_tells():
    (p0, p1, p2), read = ranks(3)
    read()
    assert p0.peer_states == [RankState.STARTING] * 3 and p0.reported() == 0
    p0.outbox.state = RankState.READY
    assert p0.reported() == 1 and p0.peer_states[0] is RankState.READY  # its own state before the board says it
    p1.outbox.state = RankState.FAILED
    p2.outbox.state = RankState.READY
    assert p0.peer_states[1:] == [RankState.STARTING] * 2  # not read yet
    read()
    assert p0.peer_states == [RankState.READY, RankState.FAILED, RankState.READY]  # all reported: the rest READY
    assert p2.ranks_in(RankState.FAILED, RankState.GAVE_UP) == [1] and p2.ranks_in(RankState.READY) == [0, 2]


def test_everyone_idle_counts_out_ranks():
    (p0, p1), read = ranks(2)
    p0.outbox.idle = True
    read()
    assert not p0.everyone_idle()
    p1.outbox.state = RankState.GAVE_UP  # out: idle for good
    read()
    assert p0.everyone_idle() and p1.everyone_idle()


def test_a_rank_alone_needs_no_board():
    alone = Peers(0, 1, Outbox())
    assert not alone.shared and alone.reported() == 0 and not alone.everyone_idle()
    alone.outbox.state = RankState.READY
    alone.outbox.idle = True
    assert alone.reported() == 1 and alone.everyone_idle() and alone.peer_states == [RankState.READY]


def test_the_control_planes_error_is_raised_in_the_loop():
    peers = Peers(1, 2, Outbox())
    peers.check()  # no error: nothing
    peers.error = RuntimeError("Connection closed by peer [127.0.0.1]:4242\n  at gloo/transport.cc")
    with pytest.raises(RunFailure, match=r"^rank 1 lost the other ranks \(Connection closed by peer "
                                         r"\[127.0.0.1\]:4242\); a rank failed or died: see its log\. Rerun with the "
                                         r"same output_dir") as e:
        peers.check()
    assert isinstance(e.value.__cause__, RuntimeError) and peers.acknowledged.is_set()
    peers.error = RunFailure("rank 1 stops: rank 0 left without a word")  # already one line: as it is
    with pytest.raises(RunFailure, match="^rank 1 stops: rank 0 left without a word$"):
        peers.check()


def test_no_rank_could_generate_is_one_line():
    (p0, p1), read = ranks(2)
    p1.outbox.state = RankState.FAILED
    read()
    p0.raise_if_stopped(None, 10, is_rank0=True)  # rank 0 still runs: nothing to say
    p0.outbox.state = RankState.FAILED
    with pytest.raises(RunFailure, match=r"no rank could start its engine \(this rank: no GPU\)"):
        p0.raise_if_stopped("no GPU", 10, is_rank0=True)
    (q0, q1), read = ranks(2)
    q0.outbox.state = RankState.READY
    q0.outbox.state = RankState.GAVE_UP
    q1.outbox.state = RankState.FAILED
    read()
    with pytest.raises(RunFailure, match="no rank could keep its engine running"):
        q1.raise_if_stopped("engine died", 10, is_rank0=False)


def test_a_drained_rank_stops_with_the_signals_code_unless_all_was_committed():
    drain = Drain(5.0)
    (p0, p1), read = ranks(2, drain)
    for p in (p0, p1):
        p.outbox.state = RankState.READY
    read()
    p1.raise_if_stopped(None, 4, is_rank0=False)  # no drain
    drain.request(signal.SIGTERM, "SIGTERM")
    p0.raise_if_stopped(None, 4, is_rank0=True)  # rank 0 says what was committed itself (Rank0.finish)
    with pytest.raises(Drained, match="stopped by SIGTERM after draining") as e:
        p1.raise_if_stopped(None, 4, is_rank0=False)
    assert e.value.code == 128 + signal.SIGTERM
    p0.outbox.board.committed(4)  # every batch committed before the drain took effect: a normal end
    read()
    p1.raise_if_stopped(None, 4, is_rank0=False)
