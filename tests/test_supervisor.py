"""Engine supervision (spmd_dp/engines/supervisor.py) without a process group: the supervisor sees a dead, stuck
or vanished engine and restarts it on the same slice, up to max_engine_restarts; the generation loop re-adds its
requests to the new engine, or hands its batches back when the supervisor gives up. Stand-in engines."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from spmd_dp.engines import EngineFailure, EngineGaveUp, EngineStartError
from spmd_dp.engines.supervisor import SupervisedEngine
from tests.helpers import FakeEngine, run_loop, token_records

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


@pytest.mark.timing
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


@pytest.mark.timing
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
