"""A rank's engine timed on a short sample of the input: what the projection is made of.

Each rank draws its sample across the whole input (evenly spaced, offset by rank, so the ranks' samples
interleave), builds the records' requests as the run does, warms its real engine up on the records next to them
(an engine's first steps are slow: allocations, first calls of its kernels; other records, so that no prefix cache
serves the sample), then adds the sample all at once (as the generation loop keeps it full) and steps the engine
until it finishes, noting for each request in the order it was added when it finished and its tokens. How the
finish times become a speed is spmd_dp/preflight/project.py's.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

from spmd_dp.log import logger


def sample_positions(n_records: int, k: int, rank: int, world: int) -> List[int]:
    """k positions spread over [0, n): j-th at (j + (rank + 0.5) / world) * n / k, in order, without repeats."""
    if n_records <= 0 or k <= 0:
        return []
    k = min(k, n_records)
    step = n_records / k
    return sorted({min(int((j + (rank + 0.5) / world) * step), n_records - 1) for j in range(k)})


WARMUP_TOKENS = 4  # output tokens of each warm-up request


def _requests(index, prompts, sampling: Dict[str, Any], positions: List[int], tag: str) -> list:
    out = []
    for p in positions:
        record = index.read(p, p + 1)[0]
        if record is not None:
            out.append(prompts.request(f"preflight-{tag}{p}:0", record, sampling))
    return out


def _run(engine, requests: list, timeout_s: float) -> Tuple[Dict[str, int], List[Tuple[float, Any]], float]:
    """Add the requests, step until they finish (bounded): (add order by request id, [(seconds, Completion)],
    seconds)."""
    t0 = time.monotonic()
    order: Dict[str, int] = {}
    for r in requests:
        if engine.add(r) is None:
            order[r.request_id] = len(order)
    done: List[Tuple[float, Any]] = []
    while len(done) < len(order) and time.monotonic() - t0 <= timeout_s:
        done += [(time.monotonic() - t0, c) for c in engine.step()]
    return order, done, time.monotonic() - t0


def calibrate(engine, index, prompts, sampling: Dict[str, Any], positions: List[int], timeout_s: float,
              rank: int, limit: Optional[int] = None) -> Dict[str, Any]:
    """Run the records at `positions` through `engine` (a SupervisedEngine); what the projection needs: for each
    request in the order it was added, when it finished, its output and prompt tokens, and the output tokens it could
    have had (`limit`: the context: a request whose prompt leaves less than its max_tokens gets what is left)."""
    n = index.n_records
    concurrency = int(getattr(engine, "concurrency", engine.capacity))
    warm = [min(p + 1, n - 1) for p in positions[:max(1, min(concurrency, len(positions)))] if p + 1 < n] or positions[:1]
    _run(engine, _requests(index, prompts, {**sampling, "max_tokens": WARMUP_TOKENS}, warm, "warm-"), timeout_s)
    requests = _requests(index, prompts, sampling, positions, "")
    asked = {r.request_id: int(r.sampling.get("max_tokens") or 16) for r in requests}
    order, done, _ = _run(engine, requests, timeout_s)
    finishes: List[List[float]] = []  # [add order, seconds since the first add, output tokens, prompt tokens, budget]
    failed = 0
    for t, c in done:
        if c.error is not None:
            failed += 1
            continue
        budget = asked.get(c.request_id, c.output_tokens)
        if limit is not None:
            budget = max(min(budget, limit - c.prompt_tokens), 0)
        finishes.append([order[c.request_id], round(t, 4), c.output_tokens, c.prompt_tokens, budget])
    if len(finishes) + failed < len(order):
        logger.warning("preflight: rank %d's sample did not finish within %.0f s (%d of %d requests)", rank,
                       timeout_s, len(finishes), len(order))
    kv = engine.kv_tokens
    if kv and finishes:  # a KV cache that holds fewer requests than the engine would run: it runs those
        per_request = sum(f[3] + f[4] for f in finishes) / len(finishes)
        concurrency = max(1, min(concurrency, int(kv // max(per_request, 1))))
    return {"rank": rank, "capacity": int(engine.capacity), "concurrency": concurrency, "records": len(finishes),
            "refused": len(requests) - len(order), "failed": failed,
            "seconds": round(max((f[1] for f in finishes), default=0.0), 4),
            "output_tokens": sum(f[2] for f in finishes), "prompt_tokens": sum(f[3] for f in finishes),
            "budget": sum(f[4] for f in finishes), "finishes": finishes}
