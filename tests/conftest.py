"""Shared helpers: run spmd_dp for real (python -m / torchrun) and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def read_jsonl(path: Path) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def journal_batches(path: Path) -> int:
    """Batches committed so far by a run (its journal's lines, the last one possibly torn)."""
    if not path.exists():
        return 0
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip().endswith("}")]
    return sum(len(e.get("batches", [])) + len(e.get("shards", [])) for e in entries)  # single | sharded


def worker_pids(torchrun_pid: int) -> Dict[int, int]:
    """torchrun's worker processes by the RANK each was given."""
    pids = {}
    for pid in subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if ranks:
            pids[int(ranks[0])] = int(pid)
    return pids


def make_records(n: int, words: int = 6, prefix: str = "r") -> List[dict]:
    return [{"id": f"{prefix}{i:05d}", "prompt": " ".join(f"w{i}_{j}" for j in range(words))} for i in range(n)]


def spmd(args: Sequence[str], nproc: Optional[int] = None, cwd: Optional[Path] = None,
         env: Optional[Dict[str, str]] = None, timeout: float = 300, torchrun_args: Sequence[str] = ()
         ) -> subprocess.CompletedProcess:
    """`python -m spmd_dp ARGS` (nproc None) or `torchrun --nproc-per-node=N -m spmd_dp ARGS`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    if nproc is None:
        cmd = [sys.executable, "-m", "spmd_dp", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", *torchrun_args, "-m", "spmd_dp", *args]
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def echo_args(tmp_path: Path, input_path: Path, *extra: str, name: str = "out") -> List[str]:
    return [f"data_dir={input_path.parent}", f"input_data_path={input_path.name}", f"output_dir={tmp_path / 'out'}",
            f"name={name}", "inference_engine=echo", "generation_options.max_tokens=4", *extra]


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "in.jsonl", make_records(50))
