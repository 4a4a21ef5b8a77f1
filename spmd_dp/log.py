"""The one logger of spmd_dp: `[rank R/W +ELAPSEDs] LEVEL message` on stderr, secrets masked (spmd_dp/redact.py).

Every module logs through `logger`; `setup_logging` is called once per process,
first without a rank (`[rank ?]`), then again once the rank is known.
"""

from __future__ import annotations

import logging
import sys
import time

from spmd_dp.redact import text as redact_text

logger = logging.getLogger("spmd_dp")

_START = time.time()  # process start, for the elapsed time in the prefix


class _RankFormatter(logging.Formatter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        elapsed = record.created - _START
        head = f"[{self.prefix} +{elapsed:.1f}s] {record.levelname}"
        msg = f"{head} {record.getMessage()}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return redact_text(msg)  # no secret in a log line (spmd_dp/redact.py)


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm, so that log lines go above rank 0's progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            # one write per line: ranks share stderr, and a line must not be split between two writes
            tqdm.write(self.format(record) + "\n", file=self.stream, end="")
        except Exception:
            self.handleError(record)


def setup_logging(rank: int | None = None, world_size: int | None = None, level: str = "INFO") -> None:
    """(Re)configure the spmd_dp logger with the rank in its prefix."""
    prefix = "rank ?" if rank is None else f"rank {rank}/{world_size}"
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(prefix))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
