"""`python -m spmd_dp.launch.torchrun [torchrun's options] -m spmd_dp [overrides]`: torchrun, exiting with its ranks'
code. The launch scripts (scripts/run_local.sh, run_multinode.sh, slurm.sbatch) start torchrun through it.

torchrun itself exits 1 whenever a rank fails, after its ChildFailedError summary, and 1 with a SignalException
traceback when it is stopped by a signal: a run that refused bad input (every rank exits 2) or drained on SIGTERM
(143) reads as 1. This module runs torchrun's own `main` in its process (the same options, signal handling, rank
processes and summary) with SPMD_DP_EXIT_DIR set; each rank writes its exit code there as it ends (spmd_dp/cli.py),
and this process exits with theirs (`ranks_code`), without the traceback.

What a reader would get wrong: it speaks for the ranks of its own node only (each node's launcher for its own); a
rank killed outright (SIGKILL, the OOM killer) leaves no code, and torchrun's (1, or 128 + the signal) stands.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

EXIT_DIR_VAR = "SPMD_DP_EXIT_DIR"


def write_exit_code(directory: Optional[str], rank: Optional[str], code: int) -> None:
    """A rank's exit code, for the launcher above it (spmd_dp/cli.py calls this as the rank ends)."""
    if not directory or rank is None:
        return
    try:
        tmp = Path(directory) / f".rank-{rank}.tmp"
        tmp.write_text(str(code))
        os.replace(tmp, Path(directory) / f"rank-{rank}")
    except OSError:
        pass  # the launcher's own code stands


def read_exit_codes(directory: str) -> Dict[int, int]:
    codes = {}
    for path in Path(directory).glob("rank-*"):
        try:
            codes[int(path.name.split("-", 1)[1])] = int(path.read_text())
        except (OSError, ValueError):
            continue
    return codes


def ranks_code(codes: Dict[int, int], own: int) -> int:
    """Rank 0's code when it is not 0 (rank 0 prints the run's line), else the lowest rank's that is not 0, else
    torchrun's own (`own`: 0 when every rank ended well; 1, or 128 + a signal, when a rank left no code)."""
    if codes.get(0):
        return codes[0]
    failed = [codes[r] for r in sorted(codes) if codes[r]]
    return failed[0] if failed else own


def main(argv: Sequence[str]) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    directory = tempfile.mkdtemp(prefix="spmd_dp-exit-")
    os.environ[EXIT_DIR_VAR] = directory  # the ranks inherit it
    try:
        try:
            torchrun.main(list(argv))
            own = 0
        except ChildFailedError as e:  # its summary: each failed rank, its exit code and its line
            print(f"torchrun: {type(e).__name__}:\n{e}", file=sys.stderr)
            own = 1
        except SignalException as e:  # torchrun stopped its ranks with the signal it got (they drain)
            own = 128 + int(e.sigval)
            print(f"torchrun: got {signal.Signals(e.sigval).name} and passed it to its ranks", file=sys.stderr)
        except SystemExit as e:  # its own usage errors
            own = e.code if isinstance(e.code, int) else 1
        return ranks_code(read_exit_codes(directory), own)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
