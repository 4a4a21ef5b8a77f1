"""What a rank is and where its outputs go: derived once from the launcher's environment and the config.

`RankPlan.build(cfg, environ)` is the rank's frozen plan (like torchtitan's `ParallelDims`):
rank, world, local rank, launcher, its device slice and its vLLM port range, validated in
one place against WORLD_SIZE; `OutputPaths.of(cfg)` is every file the run writes, with `~`
and relative paths resolved once. Neither imports torch or vLLM: both are unit-tested with
plain dicts and no process group (tests/test_plan.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from spmd_dp.config import RunConfig
from spmd_dp.devices import VLLM_PORT_STRIDE, DeviceSlice, plan_device_slice, vllm_port_base
from spmd_dp.errors import UsageError
from spmd_dp.launcher import RankEnv
from spmd_dp.model import is_embedded


@dataclass(frozen=True)
class RankPlan:
    env: RankEnv
    device: DeviceSlice
    vllm_port: int  # the first of this rank's VLLM_PORT_STRIDE ports

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_rank0(self) -> bool:
        """The one rank that journals, commits and reports (the only answer to "am I rank 0?")."""
        return self.env.rank == 0

    @classmethod
    def build(cls, cfg: RunConfig, environ: Optional[Mapping[str, str]] = None,
              physical_gpus="query") -> "RankPlan":
        """physical_gpus: the node's (index, uuid) list, or "query" to ask nvidia-smi (tests pass a list)."""
        environ = os.environ if environ is None else environ
        eo = cfg.engine_options
        env = RankEnv.from_environ(environ, eo.dp_master_ip, eo.dp_master_port)
        if eo.data_parallel_size is not None and eo.data_parallel_size != env.world_size:
            raise UsageError(
                f"config error: engine_options.data_parallel_size={eo.data_parallel_size} but WORLD_SIZE="
                f"{env.world_size}; launch {eo.data_parallel_size} ranks (torchrun --nproc-per-node=... x --nnodes) "
                f"or leave data_parallel_size null")
        bad = [r for r in cfg.generation_options_per_rank if int(r) >= env.world_size]
        if bad:
            raise UsageError(f"config error: generation_options_per_rank names ranks {', '.join(bad)} but "
                             f"WORLD_SIZE={env.world_size}; use ranks 0..{env.world_size - 1}")
        if not eo.enable_data_parallel and env.world_size > 1:
            raise UsageError(f"config error: engine_options.enable_data_parallel=false runs one engine but "
                             f"WORLD_SIZE={env.world_size}; launch one process or set enable_data_parallel=true")
        if cfg.inference_engine == "echo":
            device = DeviceSlice("cpu", (), 1)  # the echo engine uses no device
        else:
            device = plan_device_slice(eo.device, env.local_rank, env.local_world_size, eo.gpus_per_dp_rank,
                                       eo.cpu_cores_per_dp_rank, environ, physical_gpus)
        return cls(env, device, vllm_port_base(env.master_port, env.local_rank, environ))

    def describe(self) -> str:
        e = self.env
        return (f"rank {e.rank}/{e.world_size} (local {e.local_rank}/{e.local_world_size}, {e.launcher}) "
                f"on {self.device.describe()}, vLLM ports {self.vllm_port}-{self.vllm_port + VLLM_PORT_STRIDE - 1}")


@dataclass(frozen=True)
class OutputPaths:
    """Every file a run writes under `output_dir` (absolute, `~` expanded): the one place they are named."""

    dir: Path
    final: Path  # ${name}.jsonl | ${name}.parquet
    metrics: Path  # ${name}.metrics.json
    config: Path  # ${name}.config.yaml: the resolved config
    journal: Path  # ${name}.journal.jsonl: what is committed (how a rerun resumes)
    parts: Path  # ${name}.parts/: committed batches until the final file is written
    errors: Path  # ${name}.errors.jsonl: skipped bad records (on_bad_record=skip)
    shards: Optional[Path] = None  # output_mode=sharded: ${name}/, the folder of shards (None: one file)

    @property
    def output(self) -> Path:
        """What the run produces: the folder of shards, or the one file."""
        return self.shards if self.shards is not None else self.final

    @property
    def manifest(self) -> Path:
        """The shard folder's manifest (a `_` name: pyarrow.dataset and datasets' folder readers skip it)."""
        assert self.shards is not None
        return self.shards / "_manifest.json"

    @classmethod
    def of(cls, cfg: RunConfig) -> "OutputPaths":
        d = Path(cfg.output_dir).expanduser().resolve()
        n = cfg.name
        shards = d / n if cfg.output_mode == "sharded" and not cfg.merge else None
        return cls(d, d / f"{n}.{cfg.output_format}", d / f"{n}.metrics.json", d / f"{n}.config.yaml",
                   d / f"{n}.journal.jsonl", d / f"{n}.parts", d / f"{n}.errors.jsonl", shards)


def preflight(cfg: RunConfig) -> None:
    """Checks on the local machine that need no process group (every rank runs them)."""
    if cfg.inference_engine == "vllm_dp" and not is_embedded(cfg.model_name):
        looks_local = cfg.model_name.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(cfg.model_name).expanduser().exists():
            raise UsageError(f"config error: model_name={cfg.model_name!r} is a path that does not exist; "
                             f"give an existing model folder or a hub id")
