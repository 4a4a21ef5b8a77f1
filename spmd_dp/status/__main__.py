"""`python -m spmd_dp.status OUTPUT_DIR [NAME] [--watch] [--json] [--plot FILE]`: how a run stands, from its files.

A running job's live status (rank 0 rewrites `${name}.status.json` every few seconds), a finished one's last, and
for one that died, what its journal has committed and that nothing is running. `--plot FILE` draws the timeline
of the run's last start (spmd_dp/status/timeline.py). Exit codes: 0 shown, 2 no such run (or no matplotlib for
--plot: the line says how to get it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from spmd_dp.output.paths import OutputPaths
from spmd_dp.status.history import current_status, names, read_history
from spmd_dp.status.live import STATUS_EVERY_S
from spmd_dp.status.show import table


def _paths(output_dir: str, name: Optional[str]) -> OutputPaths:
    d = Path(output_dir).expanduser()
    if not d.is_dir():
        raise SystemExit(f"spmd_dp.status: {d} is not a folder; give a run's output_dir")
    found = names(d)
    if name is None:
        if len(found) != 1:
            what = f"runs {', '.join(found)}: name one" if found else "no run (no *.journal.jsonl or *.status.json)"
            raise SystemExit(f"spmd_dp.status: {d} has {what}; python -m spmd_dp.status {d} NAME")
        name = found[0]
    elif name not in found:
        raise SystemExit(f"spmd_dp.status: {d} has no run named {name!r} (runs: {', '.join(found) or 'none'})")
    return OutputPaths.named(d, name)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spmd_dp.status", description="How a spmd_dp run stands.")
    ap.add_argument("output_dir")
    ap.add_argument("name", nargs="?", help="the run's name (needed when the folder holds several)")
    ap.add_argument("--watch", action="store_true", help=f"print it again every {STATUS_EVERY_S:g} s until it ends")
    ap.add_argument("--json", action="store_true", help="print the status as JSON")
    ap.add_argument("--plot", metavar="FILE", help="draw the run's timeline (PNG) into FILE")
    args = ap.parse_args(argv)
    try:
        paths = _paths(args.output_dir, args.name)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if args.plot:
        from spmd_dp.status.timeline import HOW, draw, have_matplotlib

        if not have_matplotlib():
            print(f"spmd_dp.status: drawing the timeline needs matplotlib: {HOW}", file=sys.stderr)
            return 2
        try:
            out = draw(read_history(paths).last_run(), Path(args.plot))
        except ValueError as e:
            print(f"spmd_dp.status: {e}", file=sys.stderr)
            return 2
        print(f"timeline of {paths.name}: {out}")
        return 0
    while True:
        status = current_status(paths)
        if args.json:
            print(json.dumps(status, indent=1))
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(table(status), flush=True)
        if not (args.watch and status.get("running")):
            return 0
        time.sleep(STATUS_EVERY_S)
        if not sys.stdout.isatty():
            print()


if __name__ == "__main__":
    sys.exit(main())
