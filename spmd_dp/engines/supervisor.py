"""A rank's engine, supervised: a dead or stuck engine is seen in seconds and rebuilt on the same slice.

`SupervisedEngine` has the `Engine` interface and owns the real engine (vLLM or echo).
It runs each `step()` on a thread of its own and waits for it in short slices, so the
rank notices at once what vLLM's frontend does not always report: vLLM 0.32 raises
EngineDeadError when its EngineCore fails with an error, but when that process is
killed (kill -9, the OOM killer) its `step()` waits forever on a queue nobody fills.
So the supervisor also watches the engine's processes, found by parent pid when the
engine starts (spmd_dp/launch/procs.py), and bounds every step by `batch_timeout`.

A fault (the engine raised, its process is gone, or no step returned in time) is raised
as `EngineFailure`: the requests in the engine are lost. The generation loop
(spmd_dp/generation.py) then calls `restart()`, which logs one line naming the rank,
its devices and the cause, ends what is left of the engine's processes, and starts a new
engine on the same slice; the loop re-adds the requests of its unfinished batches (they
were not committed: nothing is lost, nothing is written twice). After
`engine_options.max_engine_restarts` restarts, or when a new engine cannot start,
`restart()` raises `EngineGaveUp` and the loop hands its work back to the other ranks.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, List, Optional

from spmd_dp.engines.base import Completion, Engine, EngineFailure, EngineGaveUp, EngineStartError, Request
from spmd_dp.log import logger
from spmd_dp.launch.procs import descendants, engine_processes, gone, terminate

POLL_S = 0.1  # how often a waiting step looks at the engine's processes
CLOSE_S = 10.0  # how long a failed engine may take to close before its processes are killed


class _Stepper(threading.Thread):
    """One daemon thread that runs an engine's calls. A stuck call is abandoned with its thread: being a
    daemon (unlike concurrent.futures' workers, joined at exit), it never holds the process at exit."""

    def __init__(self) -> None:
        super().__init__(name="spmd_dp-engine-step", daemon=True)
        self.calls: "queue.Queue[tuple]" = queue.Queue()
        self.start()

    def submit(self, fn: Callable) -> Future:
        future: Future = Future()
        self.calls.put((fn, future))
        return future

    def run(self) -> None:
        while True:
            fn, future = self.calls.get()
            if fn is None:
                return
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

    def stop(self, wait_s: float = 1.0) -> None:
        """End the thread once its call returns (waiting a little: a stuck one is abandoned)."""
        self.calls.put((None, None))
        self.join(wait_s)


class SupervisedEngine:
    def __init__(self, start: Callable[[int], Engine], rank: int, where: str, max_restarts: int,
                 stall_s: float) -> None:
        """start(attempt): a new engine (attempt 0, then 1, 2, ... for restarts); it raises EngineStartError
        when it cannot start. where: the devices, for the log. stall_s: the longest a step may take."""
        self._start, self.rank, self.where = start, rank, where
        self.max_restarts, self.stall_s = max_restarts, stall_s
        self.restarts = 0
        self.faults: List[str] = []  # the cause of each fault, in order
        self.engine: Engine
        self._launch(0)

    @property
    def capacity(self) -> int:
        return self.engine.capacity

    @property
    def kv_tokens(self) -> Optional[int]:
        return self.engine.kv_tokens

    @property
    def concurrency(self) -> int:
        """Requests it runs at once (the echo engine with a delay: one); else its capacity."""
        return getattr(self.engine, "concurrency", self.engine.capacity)

    def _launch(self, attempt: int) -> None:
        before = {p.pid for p in descendants()}
        self.engine = self._start(attempt)
        self.processes = engine_processes([p for p in descendants() if p.pid not in before])
        self.stepper = _Stepper()

    def add(self, request: Request) -> Optional[Completion]:
        try:
            return self.engine.add(request)
        except Exception as e:  # the engine refuses a bad request with a Completion; an error is the engine's
            raise EngineFailure(f"adding a request raised {_describe(e)}") from e

    def step(self) -> List[Completion]:
        future = self.stepper.submit(self.engine.step)
        deadline = time.monotonic() + self.stall_s
        while True:
            try:
                return future.result(timeout=POLL_S)
            except Exception as e:
                if future.done():  # else the wait timed out and the step goes on
                    logger.debug("the engine's step raised", exc_info=True)
                    raise EngineFailure(f"it raised {_describe(e)}") from e
            dead = gone(self.processes)
            if dead is not None:
                raise EngineFailure(dead)
            if time.monotonic() > deadline:
                raise EngineFailure(f"no step returned within batch_timeout={self.stall_s}s", stalled=True)

    def restart(self, failure: EngineFailure) -> None:
        """One line naming the rank, its devices and the cause; end the old engine; start a new one on the
        same slice. Raises EngineGaveUp when max_engine_restarts are used or no new engine starts."""
        what = "stalled" if failure.stalled else "died"
        self.faults.append(f"{what}: {failure.cause}")
        head = f"rank {self.rank} on {self.where}: engine {what}: {failure.cause}"
        if self.restarts >= self.max_restarts:
            logger.error("%s; max_engine_restarts=%d used: giving up, the other ranks take this rank's work",
                         head, self.max_restarts)
            self._stop()
            raise EngineGaveUp(f"engine {what} ({failure.cause}) after {self.restarts} restarts")
        logger.warning("%s; restarting it on the same slice (restart %d of %d)", head, self.restarts + 1,
                       self.max_restarts)
        self._stop()
        while True:
            self.restarts += 1
            t0 = time.monotonic()
            try:
                self._launch(self.restarts)
            except EngineStartError as e:
                self.faults.append(f"restart failed: {e}")
                if self.restarts >= self.max_restarts:
                    logger.error("rank %d on %s: the engine could not restart (%s); max_engine_restarts=%d used: "
                                 "giving up, the other ranks take this rank's work", self.rank, self.where, e,
                                 self.max_restarts)
                    raise EngineGaveUp(f"engine {what} ({failure.cause}), then could not restart: {e}")
                logger.warning("rank %d on %s: the engine could not restart (%s); trying again (restart %d of %d)",
                               self.rank, self.where, e, self.restarts + 1, self.max_restarts)
                continue
            logger.info("Worker rank %d is ready (engine restarted in %.1fs)", self.rank, time.monotonic() - t0)
            return

    def _stop(self) -> None:
        """End the engine: close it (bounded: a stuck engine may not close), then kill what is left of its
        processes. A step still running on the old thread is abandoned with it."""
        self.stepper.stop()
        closer = threading.Thread(target=self._close_quietly, args=(self.engine,), daemon=True,
                                  name="spmd_dp-engine-close")
        closer.start()
        closer.join(CLOSE_S)
        killed = terminate(self.processes)
        if killed:
            logger.info("rank %d: ended %d process(es) left of the old engine", self.rank, killed)

    @staticmethod
    def _close_quietly(engine: Engine) -> None:
        try:
            engine.close()
        except Exception as e:  # a dead engine may fail to close cleanly; its processes are killed next
            logger.debug("closing a failed engine: %s", _describe(e))

    def close(self) -> None:
        self.stepper.stop()
        self.engine.close()
        terminate(self.processes)


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
