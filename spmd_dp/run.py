"""One rank's run, start to end: the whole data flow of spmd_dp, read from the top.

  RankPlan (launcher env + config, once) -> rendezvous store
  per workflow node:
    device slice -> the engine starts (a thread) while every rank scans its share of the input; the
    shares merge; rank 0 opens the journal (open_node) -> WorkOrder to all
    -> batches and claims -> control thread (outbox -> rank 0's handler; the board; end agreed by all)
    -> the engine, started -> generation loop -> rank 0 writes the output and the metrics
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

from spmd_dp.batches import Claims, make_batches
from spmd_dp.board import Board
from spmd_dp.comm import Group, rendezvous, substore
from spmd_dp.config import RunConfig
from spmd_dp.control import ControlPlane
from spmd_dp.devices import agree_kv_budget
from spmd_dp.drain import Drain
from spmd_dp.engines import set_engine_environment
from spmd_dp.engines.cache import EngineCache, engine_key
from spmd_dp.engines.starting import EngineStart
from spmd_dp.errors import UsageError
from spmd_dp.generation import GenerationLoop
from spmd_dp.launcher import scrub_launcher_env
from spmd_dp.log import logger, setup_logging
from spmd_dp.messages import RankState, RankStats
from spmd_dp.outbox import Outbox
from spmd_dp.plan import OutputPaths, RankPlan, preflight
from spmd_dp.prompts import PromptBuilder
from spmd_dp.rank0 import Rank0, fork_scanners, open_node
from spmd_dp.shards import shard_writer


def run(cfgs: Sequence[RunConfig]) -> int:
    """Run one job, or the text_prompt nodes of a workflow one after another, on one world."""
    plans = [RankPlan.build(cfg) for cfg in cfgs]
    plan = plans[0]
    setup_logging(plan.rank, plan.world_size, cfgs[0].log_level)
    for cfg in cfgs:
        preflight(cfg)
    builders = [PromptBuilder(cfg) for cfg in cfgs]  # every template is checked before any work
    set_engine_environment()
    # Every collective is bounded. Not below 2 minutes: ranks start (import torch, ...) at different times.
    timeout = timedelta(seconds=max(max(cfg.batch_timeout for cfg in cfgs), 120.0))
    store = rendezvous(plan.env, timeout)
    if plan.is_rank0:
        logger.info("Starting %d data parallel workers (%s, schedule=%s, batch_size=%d)", plan.world_size,
                    cfgs[0].inference_engine, cfgs[0].schedule, cfgs[0].batch_size)
    engines = EngineCache()
    drain = Drain(cfgs[0].drain_timeout).install()  # SIGTERM, SIGUSR1, Ctrl-C: finish what is in flight
    try:
        for i, (cfg, plan, prompts) in enumerate(zip(cfgs, plans, builders)):
            if len(cfgs) > 1 and plan.is_rank0:
                logger.info("workflow node %d/%d: %s", i + 1, len(cfgs), cfg.name)
            keep = i + 1 < len(cfgs) and engine_key(cfgs[i + 1], plans[i + 1].device.ids) == \
                engine_key(cfg, plan.device.ids)
            run_node(cfg, plan, prompts, substore(store, f"job{i}"), timeout, engines, keep, drain)
            drain.stop_before(cfgs[i + 1].name if i + 1 < len(cfgs) else None)
    finally:
        drain.restore()
        engines.close()
    return 0


def run_node(cfg: RunConfig, plan: RankPlan, prompts: PromptBuilder, store, timeout: timedelta,
             engines: EngineCache, keep_engine: bool, drain: Drain) -> None:
    """One workflow node on the world: `store` is its namespace (its groups and claim counters)."""
    group = Group(substore(store, "setup"), plan.rank, plan.world_size, timeout)
    plan.device.apply()
    os.environ["VLLM_PORT"] = str(plan.vllm_port)
    logger.info("%s", plan.describe())
    plan.device.log_physical(plan.rank)
    rank0 = Rank0(cfg, OutputPaths.of(cfg), prompts, plan.world_size) if plan.is_rank0 else None
    stats = RankStats(plan.rank)
    kv_budget = agree_kv_budget(plan.device, cfg.engine_options, plan.env.local_world_size, plan.world_size,
                                group.min) if cfg.engine_options.agree_kv_cache else None
    scrub_launcher_env()  # vLLM's workers must form a world of their own, not join ours
    scanners = fork_scanners(cfg, prompts, plan.device.kind, plan.env.local_world_size)  # before the engine's thread
    starting = EngineStart(engines, cfg, plan.device, plan.rank, kv_budget, stats)  # while the input is scanned
    index = control = None
    try:
        index, order = open_node(cfg, prompts, group, rank0, scanners)
        scanners.close()
        if order.error:
            raise UsageError(order.error, quiet=not plan.is_rank0)  # rank 0 prints it
        if order.complete:
            starting.stop()
            return
        batches = make_batches(cfg.schedule, order.pending, plan.world_size, cfg.batch_size)
        work = substore(store, "work")  # the claim counters and the board (spmd_dp/board.py)
        claims = Claims(work, batches, cfg.schedule, plan.rank, plan.world_size)  # logs a static share
        outbox = Outbox(plan.rank, plan.world_size, drain, Board(work, plan.rank, plan.world_size))
        control = ControlPlane(Group(substore(store, "control"), plan.rank, plan.world_size, timeout, lazy=True),
                               outbox, rank0.handle if rank0 else None, cfg.batch_timeout,
                               writer=shard_writer(cfg, plan.rank, order.shared))
        control.start()
        engine = starting.result()
        outbox.state = RankState.FAILED if engine is None else RankState.READY
        if engine is not None:
            GenerationLoop(cfg, engine, claims, index, prompts, outbox, plan.rank, stats, len(batches)).run()
            if not keep_engine or outbox.state == RankState.GAVE_UP:
                engines.release()
        outbox.put(stats)
        outbox.finish()
        control.wait_done()
        outbox.raise_if_stopped(stats.engine_failed, len(batches), plan.is_rank0)  # no rank could run, or drained
        if rank0:
            rank0.finish(drain, control.stats)
    except (Exception, KeyboardInterrupt) as e:
        if control is not None:
            control.leaving(e)  # for the other ranks to say why this one left
        raise
    finally:
        scanners.close()
        if index is not None:
            index.close()
        if rank0:
            rank0.close()
