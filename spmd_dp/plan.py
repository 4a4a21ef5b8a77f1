"""What a rank is, derived once from the launcher's environment and the config: `RankPlan` (like torchtitan's
`ParallelDims`): rank, world, local rank, launcher, its device slice and its vLLM port range, validated in one
place against WORLD_SIZE. It imports neither torch nor vLLM (unit-tested with plain dicts: tests/test_plan.py).
`is_rank0` is the only answer to "am I rank 0?": every other module is told.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from spmd_dp.config import RunConfig
from spmd_dp.launch.devices import VLLM_PORT_STRIDE, DeviceSlice, plan_device_slice, vllm_port_base
from spmd_dp.errors import UsageError
from spmd_dp.launch.launcher import RankEnv


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

    @property
    def hosts_store(self) -> bool:
        """This rank's process serves the rendezvous store (rank 0, unless torchrun's agent does)."""
        return self.is_rank0 and not self.env.agent_store

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
