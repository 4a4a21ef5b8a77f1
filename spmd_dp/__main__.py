"""`python -m spmd_dp` / `torchrun ... -m spmd_dp`: see spmd_dp/cli.py and spmd_dp/run.py."""

import os
import sys

from spmd_dp.cli import main
from spmd_dp.launch.procs import terminate_children

if __name__ == "__main__":  # vLLM spawns its engine process: this module must be import-safe
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        terminate_children()  # an engine left behind would hold the GPUs of a restarted rank
    # Everything is written and closed by now. Skip the interpreter's finalization: a peer may be gone
    # mid-collective, and gloo's worker threads release the last collective's tensors after it returns;
    # one that needs the GIL while the interpreter finalizes aborts the process ("terminate called without
    # an active exception", SIGABRT) and fails a run that succeeded.
    os._exit(code)
