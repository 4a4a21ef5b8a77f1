"""The device slice of a rank: its GPUs, or on a machine without GPUs its CPU cores.

Rank `local_rank` owns GPUs `[local_rank*g, (local_rank+1)*g)` of the GPUs the
node makes visible (inside a pre-set CUDA_VISIBLE_DEVICES), with g =
`engine_options.gpus_per_dp_rank` = vLLM's tensor_parallel_size. Without GPUs
the same rule hands out CPU cores (vLLM CPU binds its threads to
VLLM_CPU_OMP_THREADS_BIND, one `|`-separated group per tensor-parallel worker).
`DeviceSlice.environ()` is what the rank exports before anything touches CUDA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from spmd_dp.errors import UsageError
from spmd_dp.log import logger

VLLM_PORT_STRIDE = 100  # vLLM ports per rank: each rank's engine scans only its own range


@dataclass(frozen=True)
class DeviceSlice:
    kind: str  # "cuda" | "cpu"
    ids: Tuple[str, ...]  # GPU ids as CUDA_VISIBLE_DEVICES names them, or CPU core ids
    tensor_parallel_size: int

    def environ(self) -> Dict[str, str]:
        if self.kind == "cuda":
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.ids)}
        per_worker = len(self.ids) // self.tensor_parallel_size
        groups = [self.ids[i * per_worker:(i + 1) * per_worker] for i in range(self.tensor_parallel_size)]
        return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(_ranges(g) for g in groups), "CUDA_VISIBLE_DEVICES": ""}

    def apply(self) -> None:
        """Export the slice; on CPU also pin this thread, and so the engine processes it starts, to its cores: an
        unpinned engine front end steals cycles from the next rank's engine (2 ranks on 2 cores: 985 -> 1443
        output tok/s measured, docs/benchmarks.md)."""
        os.environ.update(self.environ())
        if self.kind == "cpu" and self.ids:
            os.sched_setaffinity(0, {int(c) for c in self.ids})

    def log_physical(self, rank: int) -> None:
        """Which physical GPUs the rank got (index, name, uuid, PCI bus), from NVML."""
        if self.kind == "cuda":
            logger.info("rank %d physical GPUs (index:name:uuid:bus): %s", rank,
                        ", ".join(physical_gpus(self.ids)) or "unknown (no NVML)")

    def describe(self) -> str:
        if not self.ids:
            return "no device (echo engine)"
        what = "GPUs" if self.kind == "cuda" else "CPU cores"
        return f"{what} {','.join(self.ids)} (tensor_parallel_size={self.tensor_parallel_size})"


def physical_gpus_on_node() -> Optional[List[Tuple[str, str]]]:
    """(index, uuid) of the node's GPUs from nvidia-smi; None where there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [tuple(x.strip() for x in line.split(",", 1)) for line in out.splitlines() if "," in line]


def visible_gpus(environ: Mapping[str, str], physical: Optional[List[Tuple[str, str]]]) -> Optional[Tuple[str, ...]]:
    """The GPUs this node lets us use: CUDA_VISIBLE_DEVICES when set (checked against the node's GPUs),
    else all of them; None: no GPUs."""
    preset = environ.get("CUDA_VISIBLE_DEVICES")
    if preset is None:
        return tuple(i for i, _ in physical) if physical else None
    ids = tuple(x.strip() for x in preset.split(",") if x.strip())
    if not ids:
        return None
    if not physical:
        raise UsageError(f"environment error: CUDA_VISIBLE_DEVICES={preset} names GPUs but this node has none "
                         f"(nvidia-smi lists no GPU); unset CUDA_VISIBLE_DEVICES, or use engine_options.device=cpu")
    known = [i for i, _ in physical]
    unknown = [x for x in ids if not x.startswith("MIG-") and x not in known
               and not any(u.startswith(x) for _, u in physical if x.startswith("GPU-"))]
    if unknown:
        raise UsageError(f"environment error: CUDA_VISIBLE_DEVICES={preset} names GPU {','.join(unknown)} but this "
                         f"node has GPUs {','.join(known)}; fix CUDA_VISIBLE_DEVICES")
    return ids


def gpu_slice(local_rank: int, ranks_per_node: int, g: int, gpus: Sequence[str]) -> DeviceSlice:
    need = ranks_per_node * g
    if need > len(gpus):
        raise UsageError(
            f"environment error: {ranks_per_node} ranks per node x gpus_per_dp_rank={g} need {need} GPUs but "
            f"{len(gpus)} are visible ({','.join(gpus)}); use --nproc-per-node={max(1, len(gpus) // g)} or "
            f"engine_options.gpus_per_dp_rank={max(1, len(gpus) // ranks_per_node)}")
    return DeviceSlice("cuda", tuple(gpus[local_rank * g:(local_rank + 1) * g]), g)


def cpu_slice(local_rank: int, ranks_per_node: int, g: int, cores: Sequence[int],
              cores_per_rank: Optional[int] = None) -> DeviceSlice:
    """Contiguous cores per rank; with more ranks than cores (auto sizing) ranks share cores round-robin."""
    n = len(cores)
    per_rank = cores_per_rank or max(1, n // ranks_per_node)
    if cores_per_rank and cores_per_rank * ranks_per_node > n:
        raise UsageError(
            f"environment error: {ranks_per_node} ranks x cpu_cores_per_dp_rank={cores_per_rank} need "
            f"{cores_per_rank * ranks_per_node} cores but {n} are available; lower it or leave it null")
    if per_rank < g:
        raise UsageError(
            f"environment error: a rank has {per_rank} CPU cores for gpus_per_dp_rank={g} tensor-parallel "
            f"workers; use engine_options.gpus_per_dp_rank=1 on CPU or give each rank at least {g} cores")
    per_rank -= per_rank % g
    start = (local_rank * per_rank) % n
    ids = tuple(str(cores[(start + i) % n]) for i in range(per_rank))
    return DeviceSlice("cpu", ids, g)


def plan_device_slice(device: str, local_rank: int, ranks_per_node: int, g: int, cores_per_rank: Optional[int],
                      environ: Mapping[str, str] | None = None,
                      physical: Optional[List[Tuple[str, str]]] | str = "query") -> DeviceSlice:
    env = os.environ if environ is None else environ
    if device in ("auto", "cuda"):
        gpus = visible_gpus(env, physical_gpus_on_node() if physical == "query" else physical)
    else:
        gpus = None
    if device == "cuda" and not gpus:
        raise UsageError("environment error: engine_options.device=cuda but no GPU is visible "
                         "(CUDA_VISIBLE_DEVICES / nvidia-smi); use engine_options.device=cpu or auto")
    if gpus:
        return gpu_slice(local_rank, ranks_per_node, g, gpus)
    cores = sorted(os.sched_getaffinity(0))
    return cpu_slice(local_rank, ranks_per_node, g, cores, cores_per_rank)


def cpu_kvcache_gib(options, environ: Mapping[str, str]) -> int:
    """The KV cache of a CPU engine, in GiB (vLLM CPU's VLLM_CPU_KVCACHE_SPACE)."""
    return int(options.cpu_kvcache_space_gib or environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)


def local_kv_budget(device: DeviceSlice, options, ranks_per_node: int, environ: Mapping[str, str]) -> float:
    """What this rank can give its engine: GPU: the free fraction of its fullest GPU, capped by
    gpu_memory_utilization; CPU: GiB for the KV cache, capped by half the node's free memory per rank."""
    if device.kind == "cuda":
        return min([options.gpu_memory_utilization] + [free / total for free, total in _gpu_memory(device.ids)])
    import psutil

    free_gib = psutil.virtual_memory().available / 2**30 / max(1, ranks_per_node)
    return float(max(1, min(cpu_kvcache_gib(options, environ), int(free_gib / 2))))


def agree_kv_budget(device: DeviceSlice, options, ranks_per_node: int, world: int,
                    reduce_min: Callable[[float], float]) -> float:
    """Seed 003's KV cache agreement: every rank takes the smallest budget any rank can afford (reduce_min
    is the control group's all-reduce MIN)."""
    local = local_kv_budget(device, options, ranks_per_node, os.environ)
    agreed = reduce_min(local)
    unit = "of GPU memory (gpu_memory_utilization)" if device.kind == "cuda" else "GiB (VLLM_CPU_KVCACHE_SPACE)"
    logger.info("KV cache agreed across %d ranks: %.3g %s; this rank could afford %.3g", world, agreed, unit, local)
    return agreed


def _nvml(ids: Sequence[str], query) -> list:
    """query(pynvml, handle) for each GPU id, through NVML (no CUDA context is created); [] without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no pynvml, no driver
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByUUID(i) if i.startswith(("GPU-", "MIG-"))
                   else pynvml.nvmlDeviceGetHandleByIndex(int(i)) for i in ids]
        return [query(pynvml, h) for h in handles]
    finally:
        pynvml.nvmlShutdown()


def _gpu_memory(ids: Sequence[str]) -> List[Tuple[int, int]]:
    """(free, total) bytes of each GPU."""
    return _nvml(ids, lambda nv, h: (nv.nvmlDeviceGetMemoryInfo(h).free, nv.nvmlDeviceGetMemoryInfo(h).total))


def physical_gpus(ids: Sequence[str]) -> List[str]:
    """'index name uuid bus-id' of each GPU, to show which physical GPU a rank got."""
    def one(nv, h):
        return (f"{nv.nvmlDeviceGetIndex(h)}:{nv.nvmlDeviceGetName(h)}:{nv.nvmlDeviceGetUUID(h)}:"
                f"{nv.nvmlDeviceGetPciInfo(h).busId}")
    return _nvml(ids, one)


def vllm_port_base(master_port: int, local_rank: int, environ: Mapping[str, str]) -> int:
    """A disjoint range of ports for each rank's engine on a node (vLLM scans upward from VLLM_PORT).

    Engines that start together and scan from the same port race for it (vLLM issues
    #43206, #39015); a per-rank range makes that impossible between our ranks.
    """
    base = int(environ.get("VLLM_PORT") or (master_port or 29500) + 1000)
    port = base + local_rank * VLLM_PORT_STRIDE
    if port + VLLM_PORT_STRIDE > 65535:
        port = 20000 + (port % 40000)
    return port


def _ranges(ids: Sequence[str]) -> str:
    """'0,1,2,5' -> '0-2,5' (the form VLLM_CPU_OMP_THREADS_BIND takes)."""
    nums = [int(i) for i in ids]
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)
