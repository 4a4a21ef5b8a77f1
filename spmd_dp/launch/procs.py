"""Process hygiene: no vLLM engine outlives the rank that started it, and a dead one is seen at once.

vLLM's EngineCore and worker processes survive their parent when it dies without
running its exit handlers (os._exit, SIGKILL): they hold the GPUs' memory, and a
restarted rank then finds its GPUs full. torchrun kills each worker's whole process
group when it stops or restarts a group; `terminate_children` is for our own early
exits (and runs without torchrun too). `descendants`, `gone` and `terminate` are how
the engine supervisor (spmd_dp/engines/supervisor.py) finds an engine's processes
by parent pid, notices one has died, and ends what is left of them.

What a reader would get wrong: Python's multiprocessing resource tracker, which vLLM's
first engine starts as a child of the rank, is not the engine's and is never ended
here: it ignores SIGTERM (each ending waited the whole grace for it, then killed it,
and the next engine start warned "resource_tracker: process died unexpectedly"), and
it exits by itself when the rank does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

try:
    import psutil
except ImportError:  # no vLLM installed either: no engine process is ever started
    psutil = None


PYTHON_HELPERS = ("multiprocessing.resource_tracker",)  # Python's own helper processes (above): never ours to end


def descendants() -> List["psutil.Process"]:
    """Every process started by this one, directly or not, but Python's own helpers (PYTHON_HELPERS)."""
    if psutil is None:
        return []
    return [p for p in psutil.Process().children(recursive=True) if not _python_helper(p)]


def _python_helper(p: "psutil.Process") -> bool:
    try:
        command = " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie: nothing to spare
        return False
    return any(h in command for h in PYTHON_HELPERS)


@dataclass(frozen=True)
class EngineProcess:
    """A process of an engine, as it was when it ran (a dead one can no longer be asked its name)."""

    process: "psutil.Process"
    name: str
    child: bool  # a child of this rank (vLLM's EngineCore), not one of its workers


def engine_processes(processes: Sequence["psutil.Process"]) -> List[EngineProcess]:
    me, out = os.getpid(), []
    for p in processes:
        try:
            out.append(EngineProcess(p, p.name(), p.ppid() == me))
        except psutil.Error:
            pass
    return out


def gone(processes: Sequence[EngineProcess]) -> Optional[str]:
    """Which of the rank's own children among `processes` has exited, or None. (Its workers are looked after by
    the engine process itself: vLLM's executor fails the engine when one dies.)"""
    for w in processes:
        if not w.child:
            continue
        try:
            if w.process.is_running() and w.process.status() != psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            pass
        return f"its process {w.process.pid} ({w.name}) exited"
    return None


def terminate(processes: Sequence["psutil.Process"], grace_s: float = 5.0) -> int:
    """SIGTERM the processes still running, SIGKILL those alive after grace_s. Returns how many ran."""
    if psutil is None:
        return 0
    alive = []
    for p in processes:
        p = p.process if isinstance(p, EngineProcess) else p
        try:
            if p.is_running():
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(alive)


def terminate_children(grace_s: float = 5.0) -> int:
    """SIGTERM every descendant process, SIGKILL those still alive after grace_s. Returns how many."""
    return terminate(descendants(), grace_s)
