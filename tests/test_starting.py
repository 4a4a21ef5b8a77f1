"""The engine starting in a thread while the input is scanned (spmd_dp/engines/starting.py): the caller goes on while
it starts, `result()` hands over the engine or the start's error in the caller's thread, and `stop()` ends an engine
still starting, its processes included (in a process of its own: stop ends every process the caller started), and
`abandon()` (the rank stops on an error) returns at once, after which the start says nothing."""

import json
import subprocess
import sys
import threading

import pytest

from spmd_dp.config import load_config
from spmd_dp.control.messages import RankStats
from spmd_dp.engines.cache import EngineCache
from spmd_dp.engines.starting import EngineStart
from spmd_dp.launch.devices import DeviceSlice
from spmd_dp.testing import REPO


class Gate(EngineCache):
    """An engine cache whose start waits for the test to open the gate."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def start(self, *args, **kwargs):
        assert self.gate.wait(10)
        return super().start(*args, **kwargs)


def test_the_caller_goes_on_while_the_engine_starts():
    cache = Gate()
    stats = RankStats(0)
    start = EngineStart(cache, load_config(["inference_engine=echo"]), DeviceSlice("cpu", (), 1), 0, None, stats)
    assert start._thread.is_alive() and cache.engine is None  # started, not done: the scan runs meanwhile
    cache.gate.set()
    engine = start.result()
    assert engine is cache.engine and engine.capacity == 32 and stats.engine_failed is None
    start.stop()  # nothing to run after all: the engine is closed
    assert cache.engine is None and engine.engine.closed.is_set()


def test_the_starts_error_is_raised_in_the_caller():
    class Broken(EngineCache):
        def start(self, *args, **kwargs):
            raise MemoryError("no room for the KV cache")

    start = EngineStart(Broken(), load_config([]), DeviceSlice("cpu", (), 1), 0, None, RankStats(0))
    with pytest.raises(MemoryError, match="no room"):
        start.result()


STOP_WHILE_STARTING = r"""
import json, subprocess, sys, time
from spmd_dp.config import load_config
from spmd_dp.control.messages import RankStats
from spmd_dp.engines.cache import EngineCache
from spmd_dp.engines.starting import EngineStart
from spmd_dp.launch.devices import DeviceSlice

class Starting(EngineCache):  # as vLLM's start: an engine process, waited for
    def start(self, *args, **kwargs):
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.code = self.proc.wait()
        raise RuntimeError("engine process exited during start")

cache = Starting()
start = EngineStart(cache, load_config([]), DeviceSlice("cpu", (), 1), 0, None, RankStats(0))
while not hasattr(cache, "proc"):
    time.sleep(0.01)
start.stop()
import psutil
print(json.dumps({"pid_left": psutil.pid_exists(cache.proc.pid), "thread_alive": start._thread.is_alive()}))
"""


def test_stop_ends_an_engine_still_starting():
    p = subprocess.run([sys.executable, "-c", STOP_WHILE_STARTING], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.splitlines()[-1])
    assert got == {"pid_left": False, "thread_alive": False}  # its process ended (SIGTERM), and so did the start


ABANDON_WHILE_STARTING = r"""
import subprocess, sys, time
from spmd_dp.config import load_config
from spmd_dp.control.messages import RankStats
from spmd_dp.engines.cache import EngineCache
from spmd_dp.engines.starting import EngineStart
from spmd_dp.launch.devices import DeviceSlice
from spmd_dp.launch.procs import terminate_children
from spmd_dp.log import setup_logging

setup_logging()
class Slow(EngineCache):  # an engine process, then the echo engine's start (which logs 'Worker rank 0 is ready')
    def start(self, *args, **kwargs):
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.proc.wait()
        return super().start(*args, **kwargs)

cache = Slow()
start = EngineStart(cache, load_config(["inference_engine=echo"]), DeviceSlice("cpu", (), 1), 0, None, RankStats(0))
while not hasattr(cache, "proc"):
    time.sleep(0.01)
t0 = time.monotonic()
start.abandon()
print(f"abandoned in {time.monotonic() - t0:.1f} s, the start {'running' if start._thread.is_alive() else 'ended'}",
      file=sys.stderr, flush=True)
print("spmd_dp: input error: the rank's last line", file=sys.stderr, flush=True)
terminate_children()  # as the rank's exit path does (spmd_dp/__main__.py): the start then goes on and ends
start._thread.join(30)
print("start ended" if not start._thread.is_alive() else "start still running")
"""


def test_abandon_does_not_wait_for_the_start_and_silences_it():
    p = subprocess.run([sys.executable, "-c", ABANDON_WHILE_STARTING], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "start ended", p.stderr[-2000:]  # the start finished after the error line...
    assert "is ready" not in p.stderr  # ... and said nothing
    lines = p.stderr.strip().splitlines()
    assert lines[-1] == "spmd_dp: input error: the rank's last line", p.stderr[-2000:]
    waited = float(lines[-2].split()[2])
    assert lines[-2].endswith("the start running") and waited < 5, lines[-2]  # the rank exits at once
