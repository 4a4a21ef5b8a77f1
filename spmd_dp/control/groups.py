"""Where the work is cut when neighbouring records share a prompt prefix (prefix affinity, spmd_dp/inputs/order.py).

The pending slots, laid end to end, are cut where neighbours share the least (`sharing`: prefix levels shared with
the slot before; a cut between two records that share nothing costs nothing):
- dynamic: into runs, the unit a rank claims (spmd_dp/control/claims.py). A run is at most `cap` records, cap being
  guided self-scheduling's share: (records from here to the end) / (TAIL_K x ranks), at least a batch and at most
  MAX_RUN_BATCHES batches; it ends at the cheapest cut (ties: in its last half, then after a whole number of
  batches, then the longest). So a group that fits a run is claimed whole by one rank, a larger one is cut where its
  records share least, and runs shrink to single batches at the end, as the claims of ungrouped work do.
- static: the balanced split's N-1 cuts each move to the cheapest place within STATIC_SLACK of a share.

What a reader would get wrong: runs are cut over the slots still pending, not the input: after a resume they differ
from the first run's (as batches do), and a run may span a committed gap (its batches never do).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

Span = Tuple[int, int]
MAX_RUN_BATCHES = 64  # a group larger than this many batches is split over ranks (each prefills its prefix once)
STATIC_SLACK = 0.05  # static: a share may grow or shrink by this fraction to end where neighbours share least


def costs(pending: Sequence[Span], sharing: np.ndarray) -> np.ndarray:
    """Per pending slot laid end to end: what it shares with the one before it (across a committed gap: the least
    any pair in between shares, as in a trie's order). The first costs nothing."""
    parts, prev = [], None
    for start, stop in pending:
        part = sharing[start:stop].astype(np.int16)
        if prev is not None and len(part):
            part[0] = sharing[prev + 1:start + 1].min() if start > prev + 1 else sharing[start]
        if len(part):
            parts.append(part)
            prev = stop - 1
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
    if len(out):
        out[0] = 0
    return out


def run_bounds(cost: np.ndarray, batch_size: int, world: int, tail_k: int) -> List[int]:
    """The ends of dynamic's runs over the slots laid end to end (the last is their count)."""
    total, out, p = len(cost), [], 0
    most = MAX_RUN_BATCHES * batch_size
    while p < total:
        left = total - p
        cap = min(max(-(-left // (tail_k * world)), batch_size), most)
        if left <= cap:
            out.append(total)
            break
        cut = np.arange(p + 1, p + cap + 1)
        score = cost[p + 1:p + cap + 1].astype(np.int64) * 4 + (cut - p < cap // 2) * 2 + ((cut - p) % batch_size != 0)
        best = np.flatnonzero(score == score.min())[-1]  # the cheapest; then in the last half; whole batches; longest
        p = int(cut[best])
        out.append(p)
    return out


def static_bounds(cost: np.ndarray, world: int) -> List[int]:
    """The ends of static's shares over the slots laid end to end: the balanced split's, moved to cheap cuts."""
    total = len(cost)
    floor, rem = divmod(total, world)
    slack = int(floor * STATIC_SLACK)
    out, prev = [], 0
    for r in range(1, world):
        b = r * floor + min(r, rem)
        if slack and 0 < b < total:
            lo, hi = max(prev + 1, b - slack), min(total - 1, b + slack)
            if lo <= hi:
                cut = np.arange(lo, hi + 1)
                score = cost[lo:hi + 1].astype(np.int64) * (total + 1) + np.abs(cut - b)  # cheapest, then nearest
                b = int(cut[int(np.argmin(score))])
        b = max(b, prev)
        out.append(b)
        prev = b
    out.append(total)
    return out


def take(spans: Sequence[Span], offset: int, count: int) -> List[Span]:
    """The slots at [offset, offset+count) of the spans laid end to end."""
    out, seen = [], 0
    for start, stop in spans:
        length = stop - start
        lo, hi = max(offset, seen), min(offset + count, seen + length)
        if lo < hi:
            out.append((start + lo - seen, start + hi - seen))
        seen += length
    return out
