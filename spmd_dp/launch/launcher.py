"""The launcher's environment: who started this process, and as which rank.

Only this module knows which launcher started the process: torchrun (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), Slurm's
srun without torchrun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, ...) or
nothing (one process, world size 1). `RankEnv.from_environ` returns one frozen,
validated object; a bad value raises a `UsageError` naming the variable.
`scrub_launcher_env` removes torchrun's variables before vLLM starts (vLLM's
workers must not take our gloo world for theirs). `ranks_per_node` is the launch
scripts' rule for how many ranks a node runs (`python -m spmd_dp.launch.launcher
ranks-per-node G` prints it), so the three scripts share one copy of it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

from spmd_dp.launch.devices import physical_gpus_on_node
from spmd_dp.errors import UsageError

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What torchrun and its elastic agent put in the environment; vLLM must see none of it.
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
        if _in_slurm_step(env):
            world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
            nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
            job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
            return cls(
                rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0), world_size=world,
                local_world_size=_slurm_tasks_on_node(env, world, nodes), launcher="slurm",
                master_addr=_slurm_master_addr(env, dp_master_ip, world, nodes),
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


# Step ids Slurm gives to what is not an srun step: the batch script, the extern step,
# salloc's interactive step, a pending step. A process there is one process, whatever
# SLURM_NTASKS says (the batch script sees the job's task count, not a world it is part of).
_SLURM_SPECIAL_STEPS = {"batch", "extern", "interactive", "4294967290", "4294967291", "4294967292", "4294967293",
                        "4294967294", "4294967295"}


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """A task of an `srun` step (not the batch script, which has SLURM_PROCID=0 but no step id)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    return "SLURM_PROCID" in env and step is not None and step not in _SLURM_SPECIAL_STEPS


def _expand_tasks_per_node(raw: str) -> list[int]:
    """'2(x3),1' -> [2, 2, 2, 1] (Slurm's SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE)."""
    out: list[int] = []
    for part in raw.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise UsageError(f"environment error: SLURM_STEP_TASKS_PER_NODE={raw!r} is not like '4' or '2(x3),1'")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _slurm_tasks_on_node(env: Mapping[str, str], world: int, nodes: int) -> int:
    """The tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE ('4', '2(x3),1') at SLURM_NODEID.

    SLURM_NODEID is the node's index in the job; for a step on fewer nodes than the job, the
    count at the step's node index is found by the node's name in SLURM_STEP_NODELIST.
    """
    raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not raw:
        return max(1, -(-world // max(1, nodes)))
    counts = _expand_tasks_per_node(raw)
    index = _slurm_step_node_index(env)
    if index is None or index >= len(counts):
        index = 0 if len(set(counts)) == 1 else None
    if index is None:
        raise UsageError(f"environment error: cannot tell this node's task count from SLURM_STEP_TASKS_PER_NODE="
                         f"{raw!r} (SLURM_NODEID={env.get('SLURM_NODEID')!r}, SLURMD_NODENAME="
                         f"{env.get('SLURMD_NODENAME')!r}); use the same number of tasks on every node")
    return counts[index]


def _slurm_step_node_index(env: Mapping[str, str]) -> Optional[int]:
    step_nodes = env.get("SLURM_STEP_NODELIST")
    job_nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    me = env.get("SLURMD_NODENAME")
    if step_nodes and me and step_nodes != job_nodes:
        hosts = _slurm_hostnames(step_nodes)
        return hosts.index(me) if me in hosts else None
    raw = env.get("SLURM_NODEID")
    return int(raw) if raw and raw.isdigit() else None


def _slurm_master_addr(env: Mapping[str, str], dp_master_ip: str, world: int, nodes: int) -> str:
    """Where rank 0 hosts the store: engine_options.dp_master_ip when set to a real address, else
    127.0.0.1 for a one-node step (no name to resolve), else the first host of the step's nodes."""
    if dp_master_ip and dp_master_ip not in ("127.0.0.1", "localhost", "::1"):
        return dp_master_ip
    if world == 1 or nodes == 1:
        return "127.0.0.1"
    return _slurm_head_node(env)


def _slurm_head_node(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if not nodelist:
        raise UsageError("environment error: SLURM_JOB_NODELIST is not set; run inside a Slurm allocation")
    return _slurm_hostnames(nodelist)[0]


def _slurm_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames NODELIST`, or a parse of its common forms when scontrol is not there."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return _expand_nodelist(nodelist)


def _expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5'] (one bracket per name)."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def scrub_launcher_env(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove torchrun's variables so that vLLM's own workers start a world of their own.

    With the launcher's variables gone and no default process group in the rank (spmd_dp's
    groups are its own: spmd_dp/control/comm.py), vLLM may fork its engine and workers (its default, and
    ~17 s faster a start than spawn); VLLM_WORKER_MULTIPROC_METHOD=spawn, when set, is kept."""
    env = os.environ if environ is None else environ
    removed = [k for k in list(env) if k in _SCRUB_NAMES or k.startswith(_SCRUB_PREFIXES)]
    for k in removed:
        del env[k]
    return removed


def ranks_per_node(environ: Mapping[str, str], gpus_per_rank: int, physical: Optional[list] | str = "query") -> int:
    """Ranks a launch script starts on this node: NPROC_PER_NODE when set; else the node's GPUs (Slurm's
    SLURM_GPUS_ON_NODE, else those CUDA_VISIBLE_DEVICES names, else nvidia-smi's) / gpus_per_rank; without
    GPUs, Slurm's --ntasks-per-node (SLURM_NTASKS_PER_NODE), else 1. physical: the node's (index, uuid)
    list, or "query" to ask nvidia-smi (tests pass a list)."""
    if environ.get("NPROC_PER_NODE"):
        return _int(environ, "NPROC_PER_NODE")
    if gpus_per_rank < 1:
        raise UsageError(f"launch error: GPUS_PER_DP_RANK={gpus_per_rank}; use an integer >= 1")
    if environ.get("SLURM_GPUS_ON_NODE"):
        gpus = _int(environ, "SLURM_GPUS_ON_NODE")
    elif "CUDA_VISIBLE_DEVICES" in environ:
        gpus = len([x for x in environ["CUDA_VISIBLE_DEVICES"].split(",") if x.strip()])
    else:
        gpus = len(physical_gpus_on_node() or []) if physical == "query" else len(physical or [])
    if gpus > 0:
        if gpus < gpus_per_rank:
            raise UsageError(f"launch error: {gpus} GPUs on the node but engine_options.gpus_per_dp_rank="
                             f"{gpus_per_rank}; ask for more GPUs per node or a smaller gpus_per_dp_rank")
        return gpus // gpus_per_rank
    tasks = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # '4(x2)' -> '4'
    return int(tasks) if tasks.isdigit() else 1


def _cli(argv: list[str]) -> int:
    """`python -m spmd_dp.launch.launcher ranks-per-node GPUS_PER_DP_RANK`: for scripts/*.sh and slurm.sbatch."""
    if len(argv) != 2 or argv[0] != "ranks-per-node" or not argv[1].isdigit():
        print("usage: python -m spmd_dp.launch.launcher ranks-per-node GPUS_PER_DP_RANK", file=sys.stderr)
        return 2
    try:
        print(ranks_per_node(os.environ, int(argv[1])))
    except UsageError as e:
        print(f"spmd_dp: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
