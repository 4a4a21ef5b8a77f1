"""The harness that tests, benchmarks and scripts share: run spmd_dp for real (python -m, or under torchrun) and read
what it wrote. No mocks: a run here is the real program in its own processes.

  torchrun_command / clean_env / spmd / launch / running   the command line, its environment, run it (or start it in
                                                            the background, and end it whatever happens)
  write_jsonl / read_jsonl / make_records / echo_args / expected_rows / keys_report   inputs, what the echo engine
                                                            writes, keys lost or written twice
  journal_batches / wait_until / wait_for_batches           a run's progress, waited for (every wait bounded)
  worker_pids / engine_core_pid                             its ranks' processes, a rank's vLLM EngineCore
  image_bytes / write_image_records                         images (PIL), and image records of several sizes
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from spmd_dp.launch.launcher import TORCHRUN_VARS

REPO = Path(__file__).resolve().parents[1]  # a source checkout: the repository; installed: site-packages


def clean_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """This process's environment without a launcher's rank variables (a test may itself run under one)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def torchrun_command(args: Sequence[str], nproc: Optional[int] = None, torchrun_args: Sequence[str] = (),
                     python: str = sys.executable, master_port: Optional[int] = None) -> List[str]:
    """`python -m spmd_dp ARGS` (nproc None: one process, no launcher) or `torchrun --nproc-per-node=N ... -m spmd_dp
    ARGS` with a c10d rendezvous on a free local port (as the Makefile and scripts/run_local.sh), or with
    `master_port` torchrun's static rendezvous on that port (jobs side by side then get disjoint vLLM port
    ranges, which derive from it)."""
    if nproc is None:
        return [python, "-m", "spmd_dp", *args]
    rdzv = [f"--master-port={master_port}"] if master_port is not None else ["--rdzv-backend=c10d",
                                                                            "--rdzv-endpoint=localhost:0"]
    return [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rdzv, *torchrun_args,
            "-m", "spmd_dp", *args]


def spmd(args: Sequence[str], nproc: Optional[int] = None, cwd: Optional[Path] = None,
         env: Optional[Mapping[str, str]] = None, timeout: float = 300, torchrun_args: Sequence[str] = ()
         ) -> subprocess.CompletedProcess:
    """Run spmd_dp to its end; stdout and stderr captured (text)."""
    return subprocess.run(torchrun_command(args, nproc, torchrun_args), cwd=cwd or REPO, env=clean_env(env),
                          capture_output=True, text=True, timeout=timeout)


def launch(args: Sequence[str], nproc: Optional[int] = None, cwd: Optional[Path] = None,
           env: Optional[Mapping[str, str]] = None, torchrun_args: Sequence[str] = (), log: Optional[Path] = None
           ) -> subprocess.Popen:
    """Start spmd_dp in the background (to signal or kill it mid-run): stderr into stdout, into `log` if given
    (else a pipe: read it with communicate())."""
    out = open(log, "w") if log is not None else subprocess.PIPE
    try:
        return subprocess.Popen(torchrun_command(args, nproc, torchrun_args), cwd=cwd or REPO, env=clean_env(env),
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    finally:
        if log is not None:
            out.close()


@contextlib.contextmanager
def running(proc: subprocess.Popen, grace_s: float = 60) -> Iterator[subprocess.Popen]:
    """Whatever happens inside (a failed assertion included), the run ends: SIGTERM (torchrun passes it to its
    workers, which drain), then SIGKILL after `grace_s`."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def read_jsonl(path: Path) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def make_records(n: int, words: int = 6, prefix: str = "r") -> List[dict]:
    """n records {id, prompt} whose prompts are `words` distinct words each."""
    return [{"id": f"{prefix}{i:05d}", "prompt": " ".join(f"w{i}_{j}" for j in range(words))} for i in range(n)]


def echo_args(tmp_path: Path, input_path: Path, *extra: str, name: str = "out") -> List[str]:
    """The overrides of an echo run over `input_path`, writing `${tmp_path}/out/${name}.*`, 4 words a record."""
    return [f"data_dir={input_path.parent}", f"input_data_path={input_path.name}", f"output_dir={tmp_path / 'out'}",
            f"name={name}", "inference_engine=echo", "generation_options.max_tokens=4", *extra]


def expected_rows(records: Sequence[dict], name: str = "out", words: int = 4) -> List[dict]:
    """What the echo engine writes for text records: each record plus its prompt's first `words` words."""
    return [{**r, name: " ".join(r["prompt"].split()[:words])} for r in records]


def keys_report(out_file: Path, ids: Sequence) -> Dict[str, int]:
    """Keys of `ids` absent from a JSONL output (lost), and keys in it more than once (duplicated)."""
    seen = Counter(r["id"] for r in read_jsonl(out_file)) if out_file.exists() else Counter()
    return {"lost": sum(1 for i in ids if i not in seen), "duplicated": sum(1 for n in seen.values() if n > 1)}


def journal_batches(path: Path) -> int:
    """Batches a run has committed so far (its journal's lines, the last one possibly torn; single or sharded)."""
    if not path.exists():
        return 0
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip().endswith("}")]
    return sum(len(e.get("batches", [])) + len(e.get("shards", [])) for e in entries)


def wait_until(cond: Callable[[], bool], timeout: float, proc: Optional[subprocess.Popen] = None,
               poll_s: float = 0.05) -> bool:
    """Wait (bounded) until cond() holds: False if `timeout` passed or `proc` ended first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            return bool(cond())
        time.sleep(poll_s)
    return True


def wait_for_batches(journal: Path, n: int, proc: subprocess.Popen, timeout: float = 120.0) -> int:
    """Wait (bounded) until the run has committed `n` batches or ended; the batches committed."""
    wait_until(lambda: journal_batches(journal) >= n, timeout, proc)
    return journal_batches(journal)


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


def engine_core_pid(rank_pid: int) -> Optional[int]:
    """A rank's vLLM EngineCore: its child process that vLLM names VLLM::EngineCore (None: none yet)."""
    for pid in subprocess.run(["pgrep", "-P", str(rank_pid)], capture_output=True, text=True).stdout.split():
        try:
            if "EngineCore" in Path(f"/proc/{pid}/cmdline").read_text() + Path(f"/proc/{pid}/comm").read_text():
                return int(pid)
        except OSError:
            continue
    return None


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """An image of that size (a seeded colour gradient with noise, so that no two compress alike), encoded."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), np.full_like(x, seed % 256)], axis=-1)
    pixels = (base + rng.integers(0, 32, size=base.shape)).clip(0, 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, fmt)
    return out.getvalue()


def write_image_records(d: Path, n: int, sizes: Sequence[tuple] = ((224, 224), (448, 336), (640, 480)),
                        fmt: str = "JPEG", prompt: str = "Describe this image in one sentence.") -> List[dict]:
    """n records {id, prompt, image, width, height}: image i of sizes[i % len(sizes)] written to d/images/ (its path
    relative to d, the run's data_dir)."""
    (d / "images").mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png"}.get(fmt, fmt.lower())
    records = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        name = f"images/img{i:05d}.{ext}"
        (d / name).write_bytes(image_bytes(w, h, fmt, seed=i))
        records.append({"id": f"img{i:05d}", "prompt": prompt, "image": name, "width": w, "height": h})
    return records
