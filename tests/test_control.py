"""The control thread for real: two processes over gloo on a local store, and the watchdog in one."""

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from spmd_dp.control.board import Board
from spmd_dp.control.gloo import Group
from spmd_dp.control.plane import ControlPlane
from spmd_dp.errors import RunFailure
from spmd_dp.control.messages import BatchDone, RankState, RankStats
from spmd_dp.control.outbox import Outbox
from spmd_dp.control.peers import Peers


def _rank(rank, world, store_path, out_dir):
    store = dist.FileStore(store_path, world)
    got = []

    def handle(messages):  # rank 0's handler: returns the batches it committed
        got.extend(messages)
        return sum(isinstance(m, BatchDone) for m in messages)

    outbox = Outbox(Board(dist.PrefixStore("work", store), rank, world, is_rank0=rank == 0))
    peers = Peers(rank, world, outbox)
    control = ControlPlane(Group(dist.PrefixStore("control", store), rank, world, timedelta(seconds=60),
                                 is_rank0=rank == 0, lazy=True),
                           outbox, peers, handle if rank == 0 else None, tick_s=0.05)
    control.start()
    outbox.state = RankState.READY
    for i in range(5):  # rank r finishes batches r, r+2, r+4, ...
        b = 2 * i + rank
        outbox.put(BatchDone(b, 10 * b, 10 * b + 10, rank, [json.dumps({"b": b})] * 10))
    outbox.put(RankStats(rank, records=50, batches=5))
    outbox.finish()
    control.wait_done()
    seen = [s.name for s in peers.peer_states]
    Path(out_dir, f"r{rank}.json").write_text(json.dumps({
        "peers": seen, "batches": sorted((m.index, m.rank) for m in got if isinstance(m, BatchDone)),
        "stats": sorted(m.rank for m in got if isinstance(m, RankStats)), "committed": peers.view.committed}))
    os._exit(0)  # as spmd_dp/__main__.py: gloo's pending receives (the ring watch) must not meet the finalizer


def test_two_ranks_stream_to_rank0_and_agree_on_the_end(tmp_path):
    mp.start_processes(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0 = json.loads((tmp_path / "r0.json").read_text())
    r1 = json.loads((tmp_path / "r1.json").read_text())
    assert r0["batches"] == [[b, b % 2] for b in range(10)]  # every batch of both ranks, once
    assert r0["stats"] == [0, 1]
    assert r1["batches"] == [] and r1["stats"] == []  # only rank 0 handles messages
    assert r0["peers"] == r1["peers"] == ["READY", "READY"]
    assert r1["committed"] == 10  # rank 0's commits, as rank 1 read them on the board


def test_the_watchdog_fails_the_rank_with_its_reason():
    """The engine's steps are bounded by the supervisor; a generation loop that has not gone round for
    batch_timeout + STUCK_GRACE_S is stuck elsewhere: the control thread fails the rank."""
    store = dist.HashStore()
    outbox = Outbox(Board(store, 0, 1, is_rank0=True))
    peers = Peers(0, 1, outbox)
    control = ControlPlane(Group(store, 0, 1, timedelta(seconds=30), is_rank0=True), outbox, peers, lambda msgs: 0,
                           batch_timeout=1.0, tick_s=0.02)
    outbox.heartbeat = time.monotonic() - 40  # more than 1.0 + STUCK_GRACE_S ago
    control.start()
    control.all_done.wait(30)
    with pytest.raises(RunFailure, match=r"rank 0: the generation loop has not gone round for 31s"):
        peers.check()
    assert peers.acknowledged.is_set()  # so the control thread does not end the process


def test_only_rank0_may_handle_messages():
    store = dist.HashStore()
    with pytest.raises(AssertionError):
        outbox = Outbox(Board(store, 0, 1, is_rank0=True))
        ControlPlane(Group(store, 0, 1, timedelta(seconds=5), is_rank0=True), outbox, Peers(0, 1, outbox), None)
