"""A graceful stop: SIGTERM, SIGUSR1 (Slurm's notice) or a first Ctrl-C drain the run; a second Ctrl-C stops it.

Draining: the rank claims no new batch, lets the requests in its engine finish for up
to `drain_timeout` seconds, sends what finished to rank 0 (which commits it), and the
run exits with 128 + the signal's number; a rerun with the same output_dir (a Slurm
requeue, torchrun --max-restarts) resumes from what was committed. A drain on one rank
drains them all: the control plane tells every rank (spmd_dp/control/plane.py).

vLLM's engine process gets the same signal under torchrun (it kills each worker's
process group) and Slurm (every process of the step): it is started with
`shutdown_timeout=drain_timeout`, so it finishes its requests too instead of aborting them.
"""

from __future__ import annotations

import signal
import time
from typing import Dict, Optional

from spmd_dp.errors import Drained
from spmd_dp.log import logger

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.why: Optional[str] = None  # "SIGTERM", or "SIGTERM on rank 2"
        self.signum = 0
        self.since = 0.0
        self._sigints = 0
        self.leaving = False  # the run is over (drained or failing): a signal starts nothing
        self._old: Dict[int, object] = {}

    def install(self) -> "Drain":
        """Handle the signals (from the main thread only, as Python requires)."""
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self, failing: bool = False) -> None:
        """The signals' previous handlers, unless the run drained or is failing: a SIGTERM then (torchrun's, sent
        as soon as a peer exits) must not kill the rank before it has said what was committed or why it stops.
        Such a signal does nothing any more (the rank is on its way out); a second Ctrl-C still stops it."""
        if self.requested or failing:
            self.leaving = True
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.request(signum, signal.Signals(signum).name)

    def request(self, signum: int, why: str) -> None:
        """Start draining (once): this rank got a signal, or a peer did (why names it)."""
        if self.why is not None or self.leaving:
            return
        self.why, self.signum, self.since = why, signum, time.monotonic()
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT and "rank" not in why else ""
        logger.warning("%s: draining: no new batches; the requests in flight get up to drain_timeout=%gs to "
                       "finish and be committed, then the run exits (rerun with the same output_dir to resume)%s",
                       why, self.timeout_s, again)

    @property
    def requested(self) -> bool:
        return self.why is not None

    def stop_before(self, next_node) -> None:
        """After a workflow node: a drained run does not start the next one."""
        if self.requested and next_node is not None:
            raise Drained(f"stopped by {self.why} before workflow node {next_node}; rerun with the same "
                          f"output_dir to resume", self.signum)

    def expired(self) -> bool:
        return self.why is not None and time.monotonic() - self.since > self.timeout_s
