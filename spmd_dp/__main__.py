"""`python -m spmd_dp` / `torchrun ... -m spmd_dp`: see spmd_dp/cli.py and spmd_dp/run.py."""

import os
import sys

from spmd_dp.cli import main
from spmd_dp.procs import terminate_children

if __name__ == "__main__":  # vLLM spawns its engine process: this module must be import-safe
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        terminate_children()  # an engine left behind would hold the GPUs of a restarted rank
        os._exit(code)  # a peer may be gone mid-collective: never wait on it at interpreter exit
    sys.exit(code)
