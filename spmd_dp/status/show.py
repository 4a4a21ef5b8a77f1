"""A run's status (spmd_dp/status/live.py's snapshot, or history.py's reconstruction) as the table
`python -m spmd_dp.status` prints."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional


def hms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _ago(unix: Optional[float], now: float) -> str:
    return "never" if not unix else f"{hms(max(now - unix, 0))} ago"


def table(s: Dict[str, Any], now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    rec = s.get("records", {})
    done, total = rec.get("done", 0), rec.get("total") or 0
    pct = f" ({100.0 * done / total:.1f} %)" if total else ""
    lines = []
    if s.get("running", True):
        head = f"{s['name']} in {s['output_dir']}: {s['phase']}"
        if s.get("reason"):
            head += f" ({s['reason']})"
        head += f"; rank 0 is pid {s.get('pid')} on {s.get('host')}, status updated {_ago(s.get('updated_unix'), now)}"
    elif s.get("phase") in ("done", "drained", "failed") and "not_running" not in s:
        head = f"{s['name']} in {s['output_dir']}: {s['phase']}" + (f" ({s['reason']})" if s.get("reason") else "") + \
               f"; ended {_ago(s.get('updated_unix'), now)}; nothing is running"
    else:
        last = f"; its last status said {s['last_phase']}" if s.get("last_phase") else ""
        head = (f"{s['name']} in {s['output_dir']}: NOT RUNNING ({s.get('not_running')}{last}); the journal has "
                f"{done:,} of {total:,} records committed" +
                ("" if s.get("phase") == "done" else "; rerun with the same output_dir to resume"))
    lines.append(head)
    tps = s.get("tokens_per_s", {})
    line = f"records {done:,} / {total:,}{pct}"
    if rec.get("before"):
        line += f" ({rec['before']:,} before this run)"
    if s.get("output_tokens") is not None:
        line += f"   output tokens {s['output_tokens']:,}"
    if s.get("running", True):
        line += f"   tok/s {tps.get('last_minute', 0):,.0f} last minute, {tps.get('overall', 0):,.0f} overall"
        line += f"   ETA {hms(s.get('eta_s'))}"
    lines.append(line)
    if s.get("started_unix"):
        hosts = s.get("hosts") or []
        when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['started_unix']))
        if s.get("running", True):
            ran = f"{hms(now - s['started_unix'])} ago"
        elif "not_running" in s:
            ran = f"its last status at +{hms(s.get('elapsed_s'))}"
        else:
            ran = f"ran {hms(s.get('elapsed_s'))}"
        world = s.get("world_size")
        lines.append(f"started {when} ({ran}); {world} rank{'' if world == 1 else 's'} on "
                     f"{len(hosts)} host{'' if len(hosts) == 1 else 's'}{': ' + ', '.join(hosts[:4]) if hosts else ''}"
                     f"{', ...' if len(hosts) > 4 else ''}" +
                     (f"; metrics on port {s['metrics_port']}" if s.get("metrics_port") else ""))
    ranks = s.get("ranks") or []
    if ranks:
        lines.append(f"{'rank':>5}  {'host':<16} {'state':<11} {'restarts':>8} {'batches':>8} {'records':>9} "
                     f"{'out tokens':>11}  last heartbeat")
        for r in ranks:
            beat = _ago(r.get("last_heartbeat_unix"), now) if s.get("running", True) else \
                (time.strftime("%H:%M:%S", time.localtime(r["last_heartbeat_unix"]))
                 if r.get("last_heartbeat_unix") else "-")
            lines.append(f"{r['rank']:>5}  {(r.get('host') or '-')[:16]:<16} {r.get('state', '?'):<11} "
                         f"{r.get('engine_restarts', 0):>8} {r.get('batches', 0):>8} {r.get('records', 0):>9} "
                         f"{r.get('output_tokens', 0):>11}  {beat}")
    errors = s.get("errors") or []
    if errors:
        lines.append(f"errors ({len(errors)}):")
        lines += [f"  {e}" for e in errors[-10:]]
    return "\n".join(lines)
