"""Echo-engine runs that several tests share: ONE torchrun of a workflow whose text_prompt nodes are each one test's
job, where those jobs take the same number of ranks (a torchrun start costs seconds here: torch imported by torchrun
and by each rank). A test module runs its workflow once (a module-scoped fixture) and each test reads its node: its
output, its metrics, its part of the log (tests/vllm_jobs.py's `Run`, the same reader as the shared vLLM runs).

What a reader would get wrong: the log lines a run writes once ("Starting N data parallel workers") are in the
whole log, not in a node's section; a node's section is from rank 0's "workflow node k/N: name" to the next one's.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from spmd_dp.testing import spmd
from tests.vllm_jobs import Run, node, workflow

ECHO = {"inference_engine": "echo"}


def echo_node(folder: Path, name: str, records: Sequence[dict], max_tokens: int = 4, **params) -> dict:
    """A node of the echo engine, `max_tokens` words a record (as spmd_dp.testing.echo_args), over `records`."""
    options = {"max_tokens": max_tokens, **params.pop("generation_options", {})}
    return node(folder, name, records, **ECHO, generation_options=options, **params)


def run_echo_workflow(folder: Path, nodes: Sequence[dict], nproc: Optional[int], *extra: str,
                      timeout: float = 300) -> Run:
    """Run the nodes, in this order, under torchrun (nproc ranks; None: one process); their outputs in folder/out."""
    t0 = time.monotonic()
    try:
        p = spmd([*workflow(folder, nodes), *extra], nproc=nproc, timeout=timeout)
        code, log = p.returncode, p.stderr  # the log: stderr (stdout holds only what a run prints for the user)
    except subprocess.TimeoutExpired as e:
        code, log = None, f"the run did not end within {timeout:.0f} s\n{e.stderr!s}"
    return Run(folder.name, code, log, folder / "out", wall_s=round(time.monotonic() - t0, 1))
