"""Process hygiene (spmd_dp/launch/procs.py) with real processes: an engine's processes found by parent pid, one
that exits seen at once (named, with its pid), and ended: SIGTERM, then SIGKILL for one that ignores it."""

import subprocess
import sys
import time

import psutil

from spmd_dp.launch.procs import descendants, engine_processes, gone, terminate

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                  "print('ready', flush=True); time.sleep(600)"]


def test_a_child_that_exits_is_named():
    child = subprocess.Popen(SLEEP)
    try:
        assert child.pid in {p.pid for p in descendants()}
        known = engine_processes([psutil.Process(child.pid)])
        assert known[0].child and known[0].name.startswith("python")
        assert gone(known) is None
        child.kill()
        child.wait()
        assert gone(known) == f"its process {child.pid} ({known[0].name}) exited"
    finally:
        child.kill()


def test_a_workers_exit_is_left_to_its_engine():
    """Only the rank's own children are checked: a grandchild (vLLM's worker under its EngineCore) is its engine
    process's to check."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                               "print(p.pid, flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(parent.stdout.readline())
        known = engine_processes([psutil.Process(parent.pid), psutil.Process(grandchild)])
        assert [w.child for w in known] == [True, False]
        worker = psutil.Process(grandchild)
        worker.kill()  # a zombie until its parent reaps it
        deadline = time.monotonic() + 10
        while worker.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.status() == psutil.STATUS_ZOMBIE and gone(known) is None
    finally:
        terminate([psutil.Process(parent.pid)], grace_s=5)


def test_pythons_resource_tracker_is_not_an_engine_process():
    """vLLM's first engine starts Python's multiprocessing resource tracker as a child of the rank: it ignores
    SIGTERM, so ending it with an engine cost terminate's whole grace (then a warning at the next start)."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    tracker = resource_tracker._resource_tracker._pid  # (CPython's own record of it: what this test checks against)
    child = subprocess.Popen(SLEEP)
    try:
        pids = {p.pid for p in descendants()}
        assert child.pid in pids and tracker not in pids
        assert psutil.Process(tracker).ppid() == psutil.Process().pid  # it is a child here, as under a rank
    finally:
        child.kill()
        child.wait()


def test_terminate_then_kill_what_ignores_it():
    polite, stubborn = subprocess.Popen(SLEEP), subprocess.Popen(STUBBORN, stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    procs = [psutil.Process(polite.pid), psutil.Process(stubborn.pid)]
    assert terminate(procs, grace_s=0.5) == 2
    assert procs[0].returncode == -15  # ended by SIGTERM (and reaped)
    assert stubborn.wait(10) == -9  # SIGTERM ignored: SIGKILL after the grace
    assert terminate(procs, grace_s=0.5) == 0  # nothing left running
