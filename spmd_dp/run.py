"""One rank's run, start to end: the whole data flow of spmd_dp in one place.

  RankEnv (launcher env) + config -> device slice (CUDA_VISIBLE_DEVICES / CPU cores)
  -> gloo group + rendezvous store -> rank 0 scans the input, opens the journal,
     broadcasts the index and what is left to do -> batches
  -> control plane thread (stream results to rank 0, agree on the end)
  -> engine on the slice -> generation loop -> rank 0 assembles the output + metrics
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from spmd_dp.commit import Journal, atomic_write, fingerprint
from spmd_dp.config import RunConfig, to_yaml
from spmd_dp.comm import Group
from spmd_dp.control import FAILED, READY, ControlPlane
from spmd_dp.data import BadRecord, InputIndex, RecordSpec, scan_input
from spmd_dp.devices import (VLLM_PORT_STRIDE, DeviceSlice, local_kv_budget, physical_gpus, plan_device_slice,
                             vllm_port_base)
from spmd_dp.distributed import RankEnv, scrub_launcher_env
from spmd_dp.engines import EngineStartError, build_engine
from spmd_dp.errors import RunFailure, UsageError
from spmd_dp.log import logger, setup_logging
from spmd_dp.metrics import Metrics, RankStats
from spmd_dp.model import is_embedded
from spmd_dp.progress import Progress
from spmd_dp.prompts import PromptBuilder
from spmd_dp.work import BatchQueue, make_batches
from spmd_dp.worker import Generator


@dataclass(frozen=True)
class RankPlan:
    """Everything a rank derives from its environment and the config, once, before any work."""

    env: RankEnv
    device: DeviceSlice
    vllm_port: int

    def describe(self) -> str:
        e = self.env
        return (f"rank {e.rank}/{e.world_size} (local {e.local_rank}/{e.local_world_size}, {e.launcher}) "
                f"on {self.device.describe()}, vLLM ports {self.vllm_port}-{self.vllm_port + VLLM_PORT_STRIDE - 1}")


def make_plan(cfg: RunConfig, environ=None) -> RankPlan:
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
        raise UsageError(f"config error: generation_options_per_rank names ranks {', '.join(bad)} but WORLD_SIZE="
                         f"{env.world_size}; use ranks 0..{env.world_size - 1}")
    if not eo.enable_data_parallel and env.world_size > 1:
        raise UsageError(f"config error: engine_options.enable_data_parallel=false runs one engine but "
                         f"WORLD_SIZE={env.world_size}; launch one process or set enable_data_parallel=true")
    if cfg.inference_engine == "echo":
        device = DeviceSlice("cpu", (), 1)  # the echo engine uses no device
    else:
        device = plan_device_slice(eo.device, env.local_rank, env.local_world_size, eo.gpus_per_dp_rank,
                                   eo.cpu_cores_per_dp_rank, environ)
    return RankPlan(env, device, vllm_port_base(env.master_port, env.local_rank, environ))


def preflight(cfg: RunConfig) -> None:
    """Checks on the local machine that need no process group (every rank runs them)."""
    if cfg.inference_engine == "vllm_dp" and not is_embedded(cfg.model_name):
        looks_local = cfg.model_name.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(cfg.model_name).expanduser().exists():
            raise UsageError(f"config error: model_name={cfg.model_name!r} is a path that does not exist; "
                             f"give an existing model folder or a hub id")


def _rendezvous(env: RankEnv, timeout: timedelta):
    """The rendezvous store, its keys namespaced by run and restart (it outlives a torchrun restart)."""
    if env.launcher == "single":
        store = dist.HashStore()
    else:
        store = dist.TCPStore(env.master_addr, env.master_port, world_size=env.world_size,
                              is_master=env.is_master and not env.agent_store, timeout=timeout,
                              wait_for_workers=False)
    return dist.PrefixStore(env.store_prefix, store)


def _rank0_setup(cfg: RunConfig, prompts: PromptBuilder) -> Tuple[Dict[str, Any], Optional[Journal], List[BadRecord]]:
    """Rank 0 scans the input, opens the journal and says what is left to do (or why not)."""
    try:
        index, bad = scan_input(cfg.input_path, RecordSpec(cfg.primary_key, prompts.check), cfg.batch_size,
                                skip_bad=cfg.on_bad_record == "skip")
        if bad:
            logger.warning("%d bad records in %s (first: line %d: %s); on_bad_record=skip: they go to %s",
                           len(bad), cfg.input_path, bad[0].line, bad[0].reason,
                           cfg.output_path.with_name(f"{cfg.name}.errors.jsonl"))
        fp = fingerprint(cfg, index.sha256, index.n_records, prompts.template_path)
        journal = Journal(Path(cfg.output_dir), cfg.name, fp, cfg.output_path)
        journal.open(overwrite=cfg.overwrite)
        pending = [] if journal.complete else journal.missing(index.n_records)
        atomic_write(Path(cfg.output_dir) / f"{cfg.name}.config.yaml", [to_yaml(cfg).encode()])
        return {"index": index.to_json(), "pending": pending, "complete": journal.complete}, journal, bad
    except UsageError as e:
        return {"usage_error": str(e)}, None, []
    except OSError as e:
        return {"usage_error": f"output error: {e.strerror}: {e.filename}; check that output_dir={cfg.output_dir!r} "
                               f"is a writable directory"}, None, []


def run(cfgs: Sequence[RunConfig]) -> int:
    """Run jobs one after another on one world: one job, or the text_prompt nodes of a workflow."""
    plans = [make_plan(cfg) for cfg in cfgs]
    env = plans[0].env
    setup_logging(env.rank, env.world_size, cfgs[0].log_level)
    for cfg in cfgs:
        preflight(cfg)
    builders = [PromptBuilder(cfg) for cfg in cfgs]  # every template is checked before any work
    os.environ["VLLM_USE_V1"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the seed's switch: VLLM_LOGGING_LEVEL=INFO to debug
    # Every collective is bounded. Not below 2 minutes: ranks start (import torch, ...) at different times.
    timeout = timedelta(seconds=max(max(cfg.batch_timeout for cfg in cfgs), 120.0))
    root_store = _rendezvous(env, timeout)
    if env.is_master:
        logger.info("Starting %d data parallel workers (%s, schedule=%s, batch_size=%d)", env.world_size,
                    cfgs[0].inference_engine, cfgs[0].schedule, cfgs[0].batch_size)
    engines = _EngineCache()
    try:
        for i, (cfg, plan, prompts) in enumerate(zip(cfgs, plans, builders)):
            if len(cfgs) > 1 and env.is_master:
                logger.info("workflow node %d/%d: %s", i + 1, len(cfgs), cfg.name)
            keep = i + 1 < len(cfgs) and _engine_key(cfgs[i + 1], plans[i + 1]) == _engine_key(cfg, plan)
            _run_job(cfg, plan, prompts, dist.PrefixStore(f"job{i}", root_store), timeout, engines, keep)
    finally:
        engines.close()
    return 0


def _engine_key(cfg: RunConfig, plan: RankPlan) -> str:
    """Jobs with the same key can share one engine (consecutive workflow nodes on one model)."""
    eo = {k: v for k, v in asdict(cfg.engine_options).items() if not k.startswith("dp_")}
    return json.dumps([cfg.inference_engine, cfg.model_name, eo, plan.device.ids], sort_keys=True, default=str)


class _EngineCache:
    """The rank's engine, kept from one job to the next when the next would start the same one."""

    def __init__(self) -> None:
        self.key: Optional[str] = None
        self.engine = None
        self.closing: Optional[threading.Thread] = None

    def get(self, key: str, build):
        if self.engine is not None and self.key == key:
            return self.engine, True
        self.close()
        self.engine, self.key = build(), key
        return self.engine, False

    def release(self) -> None:
        """This rank's work is done: free its devices while the others finish (vLLM takes seconds)."""
        if self.engine is not None:
            self.closing = threading.Thread(target=self.engine.close, name="spmd_dp-engine-close", daemon=True)
            self.closing.start()
            self.engine, self.key = None, None

    def close(self) -> None:
        if self.closing is not None:
            self.closing.join(timeout=60)
            self.closing = None
        if self.engine is not None:
            self.engine.close()
            self.engine, self.key = None, None


def _run_job(cfg: RunConfig, plan: RankPlan, prompts: PromptBuilder, store, timeout: timedelta,
             engines: _EngineCache, keep_engine: bool) -> None:
    """One job on the world: `store` is this job's namespace (its groups and batch counters)."""
    env = plan.env
    group = Group(dist.PrefixStore("setup", store), env.rank, env.world_size, timeout)
    plan.device.apply()
    os.environ["VLLM_PORT"] = str(plan.vllm_port)
    logger.info("%s", plan.describe())
    if plan.device.kind == "cuda":
        logger.info("rank %d physical GPUs (index:name:uuid:bus): %s", env.rank,
                    ", ".join(physical_gpus(plan.device.ids)) or "unknown (no NVML)")
    if env.is_master:
        logger.info("prompts from %s", prompts.describe())

    setup, journal, bad = _rank0_setup(cfg, prompts) if env.is_master else (None, None, [])
    setup = group.broadcast_json(setup)
    if "usage_error" in setup:
        raise UsageError(setup["usage_error"], quiet=not env.is_master)  # rank 0 prints it
    index = InputIndex.from_json(setup["index"])
    if setup["complete"]:
        if env.is_master:
            logger.info("%s is complete already (journal %s); nothing to do", cfg.output_path,
                        Path(cfg.output_dir) / f"{cfg.name}.journal.jsonl")
        return
    batches = make_batches(cfg.schedule, setup["pending"], env.world_size, cfg.batch_size)
    queue = BatchQueue(dist.PrefixStore("work", store), batches, cfg.schedule, env.rank, env.world_size)
    todo = sum(b.size for b in batches)
    if env.is_master and todo < index.n_records:
        logger.info("resuming: %d of %d records committed already, %d to go", index.n_records - todo,
                    index.n_records, todo)
    if cfg.schedule == "static":
        logger.info("Assigned %d prompts to rank %d", queue.share(env.rank), env.rank)

    committer = _Committer(cfg, journal, index, todo, env.world_size, bad) if journal is not None else None
    control = ControlPlane(Group(dist.PrefixStore("control", store), env.rank, env.world_size, timeout),
                           committer.sink if committer else None)
    control.start()

    stats = RankStats(env.rank)
    kv_budget = _agree_kv_budget(cfg, plan, group) if cfg.engine_options.agree_kv_cache else None
    scrub_launcher_env()
    t0 = time.monotonic()
    engine = None
    try:
        engine, reused = engines.get(_engine_key(cfg, plan), lambda: build_engine(cfg, plan.device, env.rank,
                                                                                 kv_budget))
    except EngineStartError as e:
        stats.engine_failed = str(e)
        logger.error("engine failed to start on rank %d: %s; this rank takes no work", env.rank, e)
        control.state = FAILED
    stats.engine_start_s = round(time.monotonic() - t0, 3)
    if engine is not None:
        control.state = READY
        logger.info("Worker rank %d is ready (engine %s in %.1fs)", env.rank, "kept" if reused else "started",
                    stats.engine_start_s)
        fair_share = -(-todo // env.world_size)
        Generator(cfg, engine, queue, index, prompts, control, env.rank, stats, fair_share).run()
        if not keep_engine:
            engines.release()
    control.put(stats.as_item())
    control.finish()
    control.wait_done()
    failed = control.ranks_in(FAILED)
    if len(failed) == env.world_size:
        raise RunFailure(f"no rank could start its engine ({stats.engine_failed}); see the log of each rank")
    if committer is not None:
        committer.finish()
    elif failed:
        logger.warning("ranks %s could not start their engines; the others did their share", failed)


def _agree_kv_budget(cfg: RunConfig, plan: RankPlan, group: Group) -> float:
    """Seed 003's KV cache agreement: every rank takes the smallest budget any rank can afford."""
    local = local_kv_budget(plan.device, cfg.engine_options, plan.env.local_world_size, os.environ)
    agreed = group.min(local)
    unit = "of GPU memory (gpu_memory_utilization)" if plan.device.kind == "cuda" else "GiB (VLLM_CPU_KVCACHE_SPACE)"
    logger.info("KV cache agreed across %d ranks: %.3g %s; this rank could afford %.3g", plan.env.world_size,
                agreed, unit, local)
    return agreed


class _Committer:
    """Rank 0's sink: commits each round's batches, logs them, keeps the metrics."""

    def __init__(self, cfg: RunConfig, journal: Journal, index: InputIndex, todo: int, world: int,
                 bad: List[BadRecord]) -> None:
        self.cfg, self.journal, self.index, self.bad = cfg, journal, index, bad
        self.metrics = Metrics(world)
        self.progress = Progress(todo)
        self.failed: Dict[int, str] = {}

    def sink(self, items: List[Dict[str, Any]]) -> None:
        batches = [it for it in items if it["kind"] == "batch"]
        if batches:
            self.journal.commit(batches)
        for it in items:
            if it["kind"] == "batch":
                logger.info("Received results for batch %d from rank %d (%d records)", it["index"], it["rank"],
                            it["records"])
                self.progress.update(it["stop"] - it["start"], it["output_tokens"])
            elif it["kind"] == "stats":
                self.metrics.add_rank(it)
                if it.get("engine_failed"):
                    self.failed[it["rank"]] = it["engine_failed"]

    def finish(self) -> None:
        self.progress.close()
        missing = self.journal.missing(self.index.n_records)
        if missing:
            raise RunFailure(f"{sum(b - a for a, b in missing)} records were not generated (first span "
                             f"{missing[0][0]}..{missing[0][1] - 1}); rerun with the same output_dir to resume")
        t0 = time.monotonic()
        size = self.journal.assemble(self.index.n_records)
        merge_s = time.monotonic() - t0
        skipped = None
        if self.cfg.on_bad_record == "skip":
            skipped = self.journal.write_errors([b.to_json() for b in self.bad])
            if skipped:
                logger.warning("%d records skipped: see %s", skipped, self.journal.errors_path)
        self.journal.close()
        report = self.metrics.report()
        report.total.update(merge_s=round(merge_s, 3), output_bytes=size, skipped_records=skipped,
                            merge_mb_per_s=round(size / 1e6 / merge_s, 1) if merge_s > 0 else None)
        atomic_write(self.cfg.metrics_path, [report.to_json().encode()])
        for line in report.table().splitlines():
            logger.info("%s", line)
        if self.failed:
            logger.warning("ranks %s could not start their engines (%s); the others did their share",
                           sorted(self.failed), "; ".join(f"rank {r}: {m}" for r, m in sorted(self.failed.items())))
