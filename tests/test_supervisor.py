"""Engine supervision without a process group: the supervisor sees a dead, stuck or vanished engine and
restarts it; the generation loop re-adds its requests or hands its batches back; returned batches are
taken once, before new work; the drain handler. Stand-in engines and a real c10d HashStore."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist

from spmd_dp.control.claims import Claims, dynamic_batches, static_batches
from spmd_dp.control.drain import Drain
from spmd_dp.engines import EngineFailure, EngineGaveUp, EngineStartError
from spmd_dp.engines.supervisor import SupervisedEngine
from spmd_dp.control.messages import RankState
from tests.test_generation import FakeEngine, run_loop, token_records

READY3 = [RankState.READY] * 3


class DyingEngine(FakeEngine):
    """FakeEngine whose step raises after `die_after` steps (as vLLM's raises EngineDeadError)."""

    def __init__(self, die_after, capacity=4):
        super().__init__(capacity, None)
        self.die_after = die_after

    def step(self):
        if self.die_after == 0:
            raise RuntimeError("EngineCore encountered an issue")
        self.die_after -= 1
        return super().step()


class HangingEngine(FakeEngine):
    def __init__(self):
        super().__init__(4, None)
        self.closed = threading.Event()

    def step(self):
        self.closed.wait()
        return []

    def close(self):
        self.closed.set()


def supervised(engines, max_restarts=2, stall_s=5.0):
    """A SupervisedEngine whose attempt i is engines[i] (an exception: that start fails; a class: made then)."""
    def start(attempt):
        e = engines[attempt]
        if isinstance(e, Exception):
            raise e
        return e() if isinstance(e, type) else e
    return SupervisedEngine(start, rank=1, where="CPU cores 1", max_restarts=max_restarts, stall_s=stall_s)


def test_supervisor_restarts_a_dead_engine_then_gives_up(caplog):
    engines = [DyingEngine(1), DyingEngine(0), EngineStartError("no GPU"), DyingEngine(0)]
    sup = supervised(engines, max_restarts=3)
    assert sup.step() == []  # the first step works
    with pytest.raises(EngineFailure) as failure:
        sup.step()
    assert not failure.value.stalled and "RuntimeError: EngineCore encountered an issue" in failure.value.cause
    sup.restart(failure.value)
    assert sup.engine is engines[1] and sup.restarts == 1
    with pytest.raises(EngineFailure) as again:
        sup.step()
    sup.restart(again.value)  # attempt 2 cannot start: counted, and attempt 3 starts
    assert sup.engine is engines[3] and sup.restarts == 3
    with pytest.raises(EngineFailure) as third:
        sup.step()
    with pytest.raises(EngineGaveUp, match="after 3 restarts"):
        sup.restart(third.value)
    log = caplog.text
    assert "rank 1 on CPU cores 1: engine died: it raised RuntimeError" in log
    assert "restarting it on the same slice (restart 1 of 3)" in log
    assert "the engine could not restart (no GPU); trying again (restart 3 of 3)" in log
    assert "max_engine_restarts=3 used: giving up" in log
    assert len(sup.faults) == 4


def test_supervisor_bounds_a_stuck_step_and_closes_the_engine():
    hung = HangingEngine()
    sup = supervised([hung, FakeEngine(4, None)], stall_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EngineFailure) as failure:
        sup.step()
    assert 0.5 <= time.monotonic() - t0 < 5
    assert failure.value.stalled and "no step returned within batch_timeout=0.5s" in failure.value.cause
    sup.restart(failure.value)
    assert hung.closed.is_set()  # the old engine was closed, which released its stuck step


def test_supervisor_sees_its_engine_process_vanish():
    """An engine whose process is killed (kill -9) without its frontend noticing: its step would wait
    forever (vLLM 0.32's get_output); the supervisor sees the process gone, by parent pid, in a poll."""

    class ProcessEngine(HangingEngine):
        def __init__(self):
            super().__init__()
            self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    sup = supervised([ProcessEngine], stall_s=60)
    engine = sup.engine
    assert [w.process.pid for w in sup.processes] == [engine.proc.pid]
    threading.Timer(0.5, os.kill, (engine.proc.pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(EngineFailure) as failure:
        sup.step()
    assert time.monotonic() - t0 < 10 and not failure.value.stalled
    assert f"its process {engine.proc.pid} (python" in failure.value.cause and "exited" in failure.value.cause
    engine.proc.wait()
    sup.close()


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


def test_loop_re_adds_requests_after_a_restart_and_finishes_every_batch(tmp_path):
    dying = [DyingEngine(3), DyingEngine(5), DyingEngine(1000)]
    engine = supervised(dying)
    sent, stats = run_loop(tmp_path, token_records(60), 4, engine)
    assert sorted(b.start for b in sent) == list(range(0, 60, 4))  # every batch exactly once
    assert sum(len(b.lines) for b in sent) == 60
    assert stats.engine_restarts == 2 and stats.engine_failed is None and stats.handed_back == 0


def test_loop_hands_its_batches_back_when_the_engine_gives_up(tmp_path):
    engine = supervised([DyingEngine(2), DyingEngine(0)], max_restarts=1)
    sent, stats = run_loop(tmp_path, token_records(60), 4, engine)
    assert stats.engine_failed.startswith("engine died") and stats.failed_at_unix > 0
    done = {b.index for b in sent}
    returned = stats.handed_back
    assert returned >= 1 and len(done) + returned <= 15
    assert stats.engine_restarts == 1


def test_drain_handler_first_ctrl_c_drains_second_stops():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        drain = Drain(5.0).install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert drain.requested and drain.why == "SIGINT" and drain.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # once draining, a SIGTERM changes nothing
        time.sleep(0.05)
        assert drain.why == "SIGINT"
        drain.restore()  # after a drain the handlers stay: a second SIGTERM must not kill the rank
        assert signal.getsignal(signal.SIGTERM) == drain._handle
        slurm = Drain(5.0).install()  # Slurm's notice
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert slurm.why == "SIGUSR1" and slurm.signum == signal.SIGUSR1 and not slurm.expired()
        quiet = Drain(5.0).install()
        quiet.restore()  # no drain: the previous handlers come back
        assert signal.getsignal(signal.SIGTERM) == slurm._handle
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
