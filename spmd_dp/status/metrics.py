"""Run metrics, kept by rank 0 from what the control plane brings: per rank and in total.

`${output_dir}/${name}.metrics.json` holds per-rank and total records, tokens,
busy time, throughput, the imbalance (max busy time / mean busy time of the
ranks that generated) and vLLM's prefix-cache hit rate (prompt tokens its cache served,
from each request's num_cached_tokens); `Report.table()` is the summary printed at the end.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from spmd_dp.control.messages import RankStats


@dataclass
class Report:
    ranks: List[RankStats]
    total: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        ranks = [{**asdict(r), "output_tokens_per_s": round(r.output_tokens_per_s, 2),
                  "prefix_cache_hit_rate": _rate(r.prefix_cache_hit_rate)} for r in self.ranks]
        return json.dumps({"ranks": ranks, "total": self.total}, indent=2) + "\n"

    def table(self) -> str:
        head = (f"{'rank':>6} {'records':>9} {'batches':>8} {'out tokens':>11} {'busy s':>9} {'tok/s':>10} "
                f"{'start s':>8} {'cache hit':>9}")
        rows = [head]

        def hit(rate: Optional[float]) -> str:  # the prefix cache's share of prompt tokens (vLLM's own count)
            return f"{rate:>9.1%}" if rate is not None else f"{'-':>9}"

        for r in self.ranks:
            note = f"  restarts {r.engine_restarts}" if r.engine_restarts else ""
            if r.engine_failed:
                when = " at start" if r.failed_at_unix is None else \
                    f" at {time.strftime('%H:%M:%S', time.localtime(r.failed_at_unix))} (+{r.failed_at_s:.1f}s)"
                note = f"{note}  engine failed{when}: {r.engine_failed}"
            if r.handed_back:
                note += f" (handed back {r.handed_back} batches)"
            rows.append(f"{r.rank:>6} {r.records:>9} {r.batches:>8} {r.output_tokens:>11} {r.busy_s:>9.2f} "
                        f"{r.output_tokens_per_s:>10.1f} {r.engine_start_s:>8.1f} {hit(r.prefix_cache_hit_rate)}{note}")
        t = self.total
        # the run's generation span (first rank's first claim to last rank's last batch), then wall time
        rows.append(f"{'total':>6} {t['records']:>9} {t['batches']:>8} {t['output_tokens']:>11} "
                    f"{t['generation_s']:>9.2f} {t['generation_tokens_per_s']:>10.1f} {'':>8} "
                    f"{hit(t.get('prefix_cache_hit_rate'))}   imbalance {t['imbalance']:.3f}, wall {t['wall_s']:.1f} s "
                    f"({t['output_tokens_per_s']:.1f} tok/s)")
        return "\n".join(rows)


class Metrics:
    def __init__(self, world: int) -> None:
        self.ranks = [RankStats(r) for r in range(world)]
        self.started = time.monotonic()
        self.started_unix = time.time()
        self.control: Dict[str, Any] = {}  # rank 0's control plane: messages, handler calls, CPU (docs/scale.md)

    def add_rank(self, stats: RankStats) -> None:
        if stats.failed_at_unix is not None:  # when, in the run's time (the table's +s)
            stats.failed_at_s = round(stats.failed_at_unix - self.started_unix, 3)
        self.ranks[stats.rank] = stats

    def report(self) -> Report:
        wall = time.monotonic() - self.started
        busy = [r.busy_s for r in self.ranks if r.busy_s > 0]
        out_tokens = sum(r.output_tokens for r in self.ranks)
        spans = [(r.gen_start_unix, r.gen_end_unix) for r in self.ranks if r.gen_end_unix > 0]
        gen_span = max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0
        total = {
            "records": sum(r.records for r in self.ranks),
            "batches": sum(r.batches for r in self.ranks),
            "prompt_tokens": sum(r.prompt_tokens for r in self.ranks),
            "output_tokens": out_tokens,
            "wall_s": round(wall, 3),
            "output_tokens_per_s": round(out_tokens / wall, 2) if wall > 0 else 0.0,
            # generation span: the first rank's first claim to the last rank's last batch
            "generation_s": round(gen_span, 3),
            "generation_tokens_per_s": round(out_tokens / gen_span, 2) if gen_span > 0 else 0.0,
            "max_busy_s": max(busy, default=0.0),
            "imbalance": round(max(busy) / (sum(busy) / len(busy)), 4) if busy else 1.0,
            "failed_ranks": [r.rank for r in self.ranks if r.engine_failed],  # each rank's row says when and why
            "engine_restarts": sum(r.engine_restarts for r in self.ranks),
            "rank0_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rank0_cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 3),
            "rank0_control": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.control.items()},
            # vLLM's prefix cache: prompt tokens it served / prompt tokens asked (requests that said; rank by rank too)
            "prefix_cache_hits": sum(r.prefix_cache_hits for r in self.ranks),
            "prefix_cache_queries": sum(r.prefix_cache_queries for r in self.ranks),
            "prefix_cache_hit_rate": _rate(sum(r.prefix_cache_hits for r in self.ranks) /
                                           max(sum(r.prefix_cache_queries for r in self.ranks), 1)
                                           if any(r.prefix_cache_queries for r in self.ranks) else None),
            "claims": sum(r.claims for r in self.ranks),
            "claim_s": round(sum(r.claim_s for r in self.ranks), 4),  # time in claims (store round trips), all ranks
        }
        return Report(self.ranks, total)


def _rate(x: Optional[float]) -> Optional[float]:
    return round(x, 4) if x is not None else None
