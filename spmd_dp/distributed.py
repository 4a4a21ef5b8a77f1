"""Who am I: the rank state derived once from the launcher's environment.

Only this module knows which launcher started the process: torchrun (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), Slurm's
srun without torchrun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, ...) or
nothing (one process, world size 1). `RankEnv.from_environ` returns one frozen,
validated object; a bad value raises a `UsageError` naming the variable.
`scrub_launcher_env` removes torchrun's variables before vLLM starts (vLLM's
workers must not take our gloo world for theirs).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

from spmd_dp.errors import UsageError

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What torchrun (and torch.distributed) put in the environment; vLLM must see none of it.
_SCRUB_PREFIXES = ("TORCHELASTIC_", "GROUP_", "ROLE_")
_SCRUB_NAMES = set(TORCHRUN_VARS) | {"TORCH_NCCL_ASYNC_ERROR_HANDLING"}

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class RankEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str  # "torchrun" | "slurm" | "single"
    master_addr: str
    master_port: int
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT (or Slurm's requeue count)
    run_id: str = "local"  # namespaces the rendezvous store's keys with restart_count
    agent_store: bool = False  # torchrun's agent hosts the TCPStore at master_addr:master_port

    def __post_init__(self) -> None:
        if not (self.world_size >= 1 and 0 <= self.rank < self.world_size):
            raise UsageError(f"environment error: rank {self.rank} is not in [0, WORLD_SIZE={self.world_size})")
        if not (1 <= self.local_world_size <= self.world_size and 0 <= self.local_rank < self.local_world_size):
            raise UsageError(
                f"environment error: LOCAL_RANK={self.local_rank}, LOCAL_WORLD_SIZE={self.local_world_size} "
                f"do not fit WORLD_SIZE={self.world_size}; launch with torchrun or srun")

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def store_prefix(self) -> str:
        return f"spmd_dp/{self.run_id}/restart{self.restart_count}"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, dp_master_ip: str = "127.0.0.1",
                     dp_master_port: Optional[int] = None) -> "RankEnv":
        env = os.environ if environ is None else environ
        present = [v for v in TORCHRUN_VARS if v in env]
        if present:
            missing = [v for v in TORCHRUN_VARS if v not in env]
            if missing:
                raise UsageError(
                    f"environment error: {', '.join(present)} set but {', '.join(missing)} not: "
                    f"launch with torchrun, or unset {', '.join(present)} to run one process")
            return cls(
                rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK"), world_size=_int(env, "WORLD_SIZE"),
                local_world_size=_int(env, "LOCAL_WORLD_SIZE"), launcher="torchrun",
                master_addr=env["MASTER_ADDR"], master_port=_int(env, "MASTER_PORT"),
                restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
                run_id=env.get("TORCHELASTIC_RUN_ID", "local"),
                agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
        if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
            world = _int(env, "SLURM_NTASKS", _int(env, "SLURM_STEP_NUM_TASKS", 1))
            nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
            local_world = _slurm_tasks_on_node(env, world, nodes)
            job = env.get("SLURM_JOB_ID", "0")
            return cls(
                rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0), world_size=world,
                local_world_size=local_world, launcher="slurm",
                master_addr=_slurm_head_node(env) if world > 1 else "127.0.0.1",
                master_port=dp_master_port or (20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT),
                restart_count=_int(env, "SLURM_RESTART_COUNT", 0), run_id=f"slurm{job}.{env.get('SLURM_STEP_ID')}")
        return cls(rank=0, local_rank=0, world_size=1, local_world_size=1, launcher="single",
                   master_addr=dp_master_ip, master_port=dp_master_port or 0)


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UsageError(f"environment error: {name} is not set; launch with torchrun or srun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment error: {name}={raw!r} is not an integer") from None


def _slurm_tasks_on_node(env: Mapping[str, str], world: int, nodes: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE looks like '4' or '2(x3),1'; the first entry is ours when even."""
    raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if raw:
        m = re.match(r"(\d+)", raw)
        if m:
            return int(m.group(1))
    return max(1, world // max(1, nodes))


def _slurm_head_node(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    if not nodelist:
        raise UsageError("environment error: SLURM_JOB_NODELIST is not set; run inside a Slurm allocation")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return re.split(r"[\[,]", nodelist)[0]


def scrub_launcher_env(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove torchrun's variables so that vLLM's own workers start a world of their own."""
    env = os.environ if environ is None else environ
    removed = [k for k in list(env) if k in _SCRUB_NAMES or k.startswith(_SCRUB_PREFIXES)]
    for k in removed:
        del env[k]
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return removed
