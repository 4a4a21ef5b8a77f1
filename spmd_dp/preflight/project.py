"""From each rank's timed sample (spmd_dp/preflight/calibrate.py) to the run's generation time at any world size.

A rank's sample runs an engine-full of requests, then the rest as the first finish (the engine full all along),
then the engine drains. A long run is mostly full engine: its speed `rate` is the output made while the engine
was still full over that time: the requests finished by then, and the share of those running then that they had
run (first come, first served; each at a steady pace), or the sample's output over its whole time if that is
more (a lower bound: it counts the drain). What the sample took beyond its output at that rate (`excess`: the ramp
and the drain) a run pays once, at its end. So a rank's share of W output tokens takes excess + W / rate, and N ranks (dynamic schedule: the
fast take more) excess + total / (sum of their rates). What a reader would get wrong: the projection is of the
generation (first claim to last batch, as metrics.json's generation_s); the wall time adds the engine start and
the scan, measured here too.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional


def rank_speed(cal: Dict[str, Any], unit_tokens: bool = True) -> Optional[Dict[str, float]]:
    """A rank's full-engine speed (output tokens a second; records a second when unit_tokens is False: pooling tasks)
    and its sample's excess seconds, from its finishes ([add order, seconds, output, prompt, budget] each). None when
    its sample did not run."""
    fin = cal.get("finishes") or []
    if not fin:
        return None
    amount = {f[0]: (f[2] if unit_tokens else 1) for f in fin}
    finish = {f[0]: f[1] for f in fin}
    times = sorted(finish.values())
    k, c = len(fin), max(1, int(cal.get("concurrency") or cal.get("capacity") or 1))
    total, t_end = float(sum(amount.values())), max(times[-1], 1e-6)
    rate = total / t_end
    if k > c:
        full_until = max(times[k - c], 1e-6)  # the engine ran `c` requests until the (k - c + 1)-th finish
        rate = max(rate, produced(amount, finish, times, c, full_until) / full_until)
    excess = max(t_end - total / rate, 0.0) if rate > 0 else t_end
    return {"rate": rate, "excess_s": excess, "sample_s": t_end, "amount": total, "records": k}


def produced(amount: Dict[int, float], finish: Dict[int, float], times: List[float], c: int, until: float) -> float:
    """Output made by `until`: the requests finished by then, and of those running then (first come, first served:
    the first `c` added at once, each next one when a request finishes) the share of their time they had run,
    at a steady pace from their start to their finish."""
    out = 0.0
    for i, o in enumerate(sorted(finish)):
        start, end = (0.0 if i < c else times[i - c]), finish[o]
        if end <= until:
            out += amount[o]
        elif start < until:
            out += amount[o] * (until - start) / max(end - start, 1e-9)
    return out


def world_sizes(n: int) -> List[int]:
    """The other world sizes the table shows: 1, and powers of two around n."""
    sizes = {1, n, max(1, n // 2), max(1, n // 4), 2 * n, 4 * n}
    return sorted(sizes)


def finish_after(amount: float, rates: List[float], starts: List[float]) -> float:
    """Seconds after the first rank starts until ranks of these speeds, starting these seconds apart, have made
    `amount` together (the dynamic schedule: each takes work from when it starts)."""
    order = sorted(zip(starts, rates))
    t0, done, rate = order[0][0], 0.0, 0.0
    for i, (start, r) in enumerate(order):
        if rate > 0 and done + rate * (start - t0) >= amount:
            break
        done += rate * (start - t0)
        t0, rate = start, rate + r
    return t0 + (amount - done) / rate - order[0][0]


def project(cals: List[Dict[str, Any]], records_to_run: int, world: int, devices_per_rank: int,
            engine_start_s: float, scan_s: float, price: Optional[float], generate: bool = True,
            budget: Optional[int] = None) -> Dict[str, Any]:
    """The projection for `records_to_run` records: at this world size (the ranks' own speeds, each from when its
    engine was up: their engine starts as measured) and others (their mean speed, together).
    budget: the output tokens every record that runs may generate (its max_tokens as the context leaves it): the
    whole input's output is the sample's share of its own budget times that (the sample's mean output a record
    times the records when the budget is unknown)."""
    speeds = [s for s in (rank_speed(c, generate) for c in cals) if s is not None]
    if not speeds:
        return {"error": "no rank's engine ran its sample: no projection"}
    sampled_records = sum(s["records"] for s in speeds)
    per_record = sum(s["amount"] for s in speeds) / sampled_records  # output tokens a record (1: pooling)
    sample_budget = sum(c.get("budget", 0) for c in cals if c.get("finishes"))
    used = sum(s["amount"] for s in speeds) / sample_budget if generate and budget and sample_budget else None
    amount = used * budget if used is not None else records_to_run * per_record
    excess = sum(s["excess_s"] for s in speeds) / len(speeds)
    mean_rate = sum(s["rate"] for s in speeds) / len(speeds)

    starts = [float(c.get("engine_start_s") or 0.0) for c in cals if rank_speed(c, generate) is not None]

    def row(n: int, rate_sum: float, skewed: bool = False) -> Dict[str, Any]:
        if rate_sum <= 0:
            gen = None
        elif skewed:  # the ranks' own speeds, each from when its engine was up
            gen = excess + finish_after(amount, [s["rate"] for s in speeds], starts)
        else:
            gen = excess + amount / rate_sum
        first_up = min(starts) if skewed else engine_start_s
        wall = None if gen is None else max(first_up, scan_s) + gen
        hours = None if wall is None else n * devices_per_rank * wall / 3600.0
        return {"ranks": n, "generation_s": _r(gen), "wall_s": _r(wall), "device_hours": _r(hours, 3),
                "cost": _r(hours * price, 2) if hours is not None and price is not None else None}

    here = row(world, sum(s["rate"] for s in speeds), skewed=True)  # a rank whose engine did not run adds nothing
    return {
        "unit": "output tokens" if generate else "records",
        "per_record": round(per_record, 2),
        "budget_used": None if used is None else round(used, 4),  # the sample's output / its max_tokens
        "records_to_run": records_to_run,
        "output_tokens": round(amount) if generate else None,
        "rate_per_rank": {"mean": round(mean_rate, 2), "min": round(min(s["rate"] for s in speeds), 2),
                          "max": round(max(s["rate"] for s in speeds), 2)},
        "excess_s": round(excess, 3),
        "engine_start_s": round(engine_start_s, 2),
        "scan_s": round(scan_s, 2),
        **here,
        "by_world_size": [row(n, mean_rate * n) for n in world_sizes(world)],
    }


def _r(x: Optional[float], digits: int = 1) -> Optional[float]:
    return None if x is None else round(x, digits)
