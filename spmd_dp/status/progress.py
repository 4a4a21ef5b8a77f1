"""Rank 0's view of the whole run, fed by every rank through the control plane.

On a terminal: ONE progress bar (records done / total, output tokens/s, ETA; tqdm).
Elsewhere (a log file, Slurm): a progress line every `every_s` seconds. The per-rank
lines stay in the logs either way (log lines are written through tqdm, above the bar).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm

from spmd_dp.log import logger


class Progress:
    def __init__(self, total: int, every_s: float = 30.0) -> None:
        self.total, self.every_s = total, every_s
        self.done = self.tokens = 0
        self.start = self.last = time.monotonic()
        self.bar: Optional[tqdm] = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, unit="rec", desc="spmd_dp", dynamic_ncols=True, file=sys.stderr,
                            disable=False, smoothing=0.05)

    def update(self, records: int, output_tokens: int) -> None:
        self.done += records
        self.tokens += output_tokens
        now = time.monotonic()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:,.0f} out tok/s", refresh=False)
            self.bar.update(records)
        elif now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            per_rec = (now - self.start) / self.done if self.done else 0.0
            eta = per_rec * (self.total - self.done)
            logger.info("progress: %d/%d records (%.1f%%), %.0f output tokens/s, ETA %s", self.done, self.total,
                        100.0 * self.done / max(self.total, 1), rate, _hms(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
