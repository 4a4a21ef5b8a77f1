"""A rank's engine timed on a short sample of the input: what the projection is made of.

Each rank draws its sample across the whole input (evenly spaced, offset by rank, so the ranks' samples
interleave), builds the records' requests as the run does, adds them all to its real engine (as the generation
loop keeps it full) and steps it until they finish, noting when each finished and its output tokens. How the
finish times become a speed is spmd_dp/preflight/project.py's.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from spmd_dp.log import logger


def sample_positions(n_records: int, k: int, rank: int, world: int) -> List[int]:
    """k positions spread over [0, n): j-th at (j + (rank + 0.5) / world) * n / k, in order, without repeats."""
    if n_records <= 0 or k <= 0:
        return []
    k = min(k, n_records)
    step = n_records / k
    return sorted({min(int((j + (rank + 0.5) / world) * step), n_records - 1) for j in range(k)})


def calibrate(engine, index, prompts, sampling: Dict[str, Any], positions: List[int], timeout_s: float,
              rank: int, limit: Optional[int] = None) -> Dict[str, Any]:
    """Run the records at `positions` through `engine` (a SupervisedEngine); what the projection needs: when each
    finished, its output tokens, its prompt tokens, and the output tokens it could have had (`limit`: the context:
    a request whose prompt leaves less than its max_tokens gets what is left)."""
    requests = []
    for p in positions:
        record = index.read(p, p + 1)[0]
        if record is not None:
            requests.append(prompts.request(f"preflight-{p}:0", record, sampling))
    asked = {r.request_id: int(r.sampling.get("max_tokens") or 16) for r in requests}
    t0 = time.monotonic()
    added = refused = 0
    for r in requests:
        if engine.add(r) is None:
            added += 1
        else:
            refused += 1
    finishes: List[List[float]] = []  # [seconds since the first add, output tokens, prompt tokens, budget]
    failed = 0
    while len(finishes) + failed < added:
        if time.monotonic() - t0 > timeout_s:
            logger.warning("preflight: rank %d's sample did not finish within %.0f s (%d of %d requests)", rank,
                           timeout_s, len(finishes), added)
            break
        for c in engine.step():
            if c.error is not None:
                failed += 1
                continue
            budget = asked.get(c.request_id, c.output_tokens)
            if limit is not None:
                budget = max(min(budget, limit - c.prompt_tokens), 0)
            finishes.append([round(time.monotonic() - t0, 4), c.output_tokens, c.prompt_tokens, budget])
    return {"rank": rank, "capacity": int(engine.capacity), "records": len(finishes), "refused": refused,
            "failed": failed, "seconds": round(max((f[0] for f in finishes), default=0.0), 4),
            "output_tokens": sum(f[1] for f in finishes), "prompt_tokens": sum(f[2] for f in finishes),
            "budget": sum(f[3] for f in finishes), "finishes": finishes}
