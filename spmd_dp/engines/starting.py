"""The rank's engine, starting in a thread while the input is scanned: the scan hides behind the engine's start.

`EngineStart` calls `EngineCache.start` (spmd_dp/engines/cache.py) in a daemon thread;
`result()` waits for it. When the node turns out to have nothing to run (its output is
complete already), `stop()` ends an engine still starting: its processes are terminated
(the thread's vLLM start then fails and the thread ends) and one already up is closed.
When the rank stops on an error, `abandon()` silences the start (it logs nothing more) and the rank's exit path
(spmd_dp/__main__.py) ends its processes.
"""

from __future__ import annotations

import threading
from typing import Optional

from spmd_dp.engines.base import Engine
from spmd_dp.log import logger
from spmd_dp.launch.procs import terminate_children

STOP_WAIT_S = 60.0
ABANDON_WAIT_S = 0.2


class EngineStart:
    def __init__(self, engines, cfg, device, rank: int, kv_budget: Optional[float], stats) -> None:
        self.engines = engines
        self._engine: Optional[Engine] = None
        self._error: Optional[BaseException] = None
        self.abandoned = False  # the rank stopped on an error: the start says nothing more
        self._thread = threading.Thread(target=self._run, args=(cfg, device, rank, kv_budget, stats),
                                        name="spmd_dp-engine-start", daemon=True)
        self._thread.start()

    def _run(self, cfg, device, rank, kv_budget, stats) -> None:
        try:
            self._engine = self.engines.start(cfg, device, rank, kv_budget, stats, quiet=lambda: self.abandoned)
        except BaseException as e:  # handed to result(), in the rank's main thread
            self._error = e

    def result(self) -> Optional[Engine]:
        """The engine (None if it could not start: the rank then takes no work)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._engine

    def abandon(self) -> None:
        """The rank stops on an error (bad input found by the scan, ...): the start says nothing more, so the
        rank's error line stays its last ("Worker rank 0 is ready" came after it when the echo engine started
        as the scan failed). Not waited for beyond ABANDON_WAIT_S (a start that is just saying it is ready): the
        rank exits at once, and its exit path (spmd_dp/__main__.py) ends the engine's processes."""
        self.abandoned = True
        self._thread.join(ABANDON_WAIT_S)

    def stop(self) -> None:
        """Nothing to run: end the engine, starting or started."""
        if self._thread.is_alive():
            logger.info("stopping the engine still starting: nothing to run")
            terminate_children()
            self._thread.join(STOP_WAIT_S)
        self.engines.close()
