"""One rank's run, start to end: the whole data flow of spmd_dp, read from the top.

  RankPlan (launcher env + config, once) -> rendezvous store
  per workflow node (a `Node`: config, plan, prompts, output):
    device slice -> rank 0 reads whether the journal says the output is complete (then no engine starts)
    -> the engine starts (a thread) while every rank scans its share of the input; the
    shares merge, with the record order (prefix affinity); rank 0 opens the journal (open_node) -> WorkOrder to all
    -> batches and claims -> control thread (outbox -> rank 0's inbox and handler; the board -> peers)
    -> the engine, started -> generation loop -> sink -> outbox ... -> rank 0 writes the output and the metrics
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

from spmd_dp.config import RunConfig
from spmd_dp.control.board import Board
from spmd_dp.control.claims import Claims, make_batches
from spmd_dp.control.comm import make_group, rendezvous, substore
from spmd_dp.control.drain import Drain
from spmd_dp.control.messages import RankState, RankStats
from spmd_dp.control.outbox import Outbox
from spmd_dp.control.peers import Peers
from spmd_dp.control.plane import ControlPlane
from spmd_dp.engines import set_engine_environment
from spmd_dp.engines.cache import EngineCache, engine_key
from spmd_dp.engines.starting import EngineStart
from spmd_dp.errors import UsageError
from spmd_dp.generation import GenerationLoop
from spmd_dp.launch.devices import agree_kv_budget
from spmd_dp.launch.launcher import scrub_launcher_env
from spmd_dp.log import logger, setup_logging
from spmd_dp.models.check import check_model
from spmd_dp.node import Node, fork_scanners, open_node
from spmd_dp.plan import RankPlan
from spmd_dp.rank0 import Rank0


@dataclass
class World:
    """What a rank keeps from one workflow node to the next: the store, the collectives' bound, its engine, the drain."""

    store: object
    timeout: timedelta
    engines: EngineCache
    drain: Drain


def run(cfgs: Sequence[RunConfig]) -> int:
    """Run one job, or the text_prompt nodes of a workflow one after another, on one world."""
    plans = [RankPlan.build(cfg) for cfg in cfgs]
    plan = plans[0]
    setup_logging(plan.rank, plan.world_size, cfgs[0].log_level)
    for cfg in cfgs:
        check_model(cfg)
    nodes = [Node.build(cfg, p) for cfg, p in zip(cfgs, plans)]  # every template is checked before any work
    set_engine_environment()
    # Every collective is bounded. Not below 2 minutes: ranks start (import torch, ...) at different times.
    timeout = timedelta(seconds=max(max(cfg.batch_timeout for cfg in cfgs), 120.0))
    store = rendezvous(plan, timeout)
    if plan.is_rank0:
        logger.info("Starting %d data parallel workers (%s, schedule=%s, batch_size=%d)", plan.world_size,
                    cfgs[0].inference_engine, cfgs[0].schedule, cfgs[0].batch_size)
    world = World(store, timeout, EngineCache(), Drain(cfgs[0].drain_timeout).install())  # SIGTERM, ...: drain
    try:
        for i, node in enumerate(nodes):
            if len(nodes) > 1 and plan.is_rank0:
                logger.info("workflow node %d/%d: %s", i + 1, len(nodes), node.cfg.name)
            after = nodes[i + 1] if i + 1 < len(nodes) else None
            keep = after is not None and engine_key(after.cfg, after.plan.device.ids) == \
                engine_key(node.cfg, node.plan.device.ids)
            if node.cfg.preflight.enabled:  # the run's own command, checked and timed instead (spmd_dp/preflight/)
                from spmd_dp.preflight import preflight_node

                preflight_node(node, world, substore(store, f"job{i}"))
            else:
                run_node(node, world, substore(store, f"job{i}"), keep)
            world.drain.stop_before(after.cfg.name if after is not None else None)
    finally:
        world.drain.restore(failing=sys.exc_info()[0] is not None)
        world.engines.close()
    return 0


def run_node(node: Node, world: World, store, keep_engine: bool) -> None:
    """One workflow node on the world: `store` is its namespace (its groups, claim counters and board)."""
    cfg, plan = node.cfg, node.plan
    group = make_group(substore(store, "setup"), plan.rank, plan.world_size, world.timeout, plan.is_rank0)
    plan.device.apply()
    os.environ["VLLM_PORT"] = str(plan.vllm_port)
    logger.info("%s", plan.describe())
    plan.device.log_physical(plan.rank)
    rank0 = Rank0(node) if plan.is_rank0 else None
    stats = RankStats(plan.rank)
    kv_budget = agree_kv_budget(plan.device, cfg.engine_options, plan.env.local_world_size, plan.world_size,
                                group.min) if cfg.engine_options.agree_kv_cache else None
    scrub_launcher_env()  # vLLM's workers must form a world of their own, not join ours
    scanners = fork_scanners(node)  # before the engine's thread
    complete = group.broadcast_json(rank0.complete_already() if rank0 else None)  # then no engine starts

    def start() -> EngineStart:
        return EngineStart(world.engines, cfg, plan.device, plan.rank, kv_budget, stats)

    starting = None if complete else start()  # while the input is scanned
    index = control = None
    try:
        index, order, work_order = open_node(node, group, rank0, scanners)
        scanners.close()
        if work_order.error:
            raise UsageError(work_order.error, quiet=not plan.is_rank0)  # rank 0 prints it
        if work_order.complete:
            if starting is not None:
                starting.stop()
            return
        starting = starting or start()  # the output said complete is gone: it is made again
        batches = make_batches(cfg.schedule, work_order.pending, plan.world_size, cfg.batch_size, order.sharing)
        work = substore(store, "work")  # the claim counters and the board (spmd_dp/control/board.py)
        claims = Claims(work, batches, cfg.schedule, plan.rank, plan.world_size)  # logs a static share
        outbox = Outbox(Board(work, plan.rank, plan.world_size, plan.is_rank0), plan.rank)
        peers = Peers(plan.rank, plan.world_size, outbox, world.drain)
        control = ControlPlane(make_group(substore(store, "control"), plan.rank, plan.world_size, world.timeout,
                                          plan.is_rank0, lazy=True),
                               outbox, peers, rank0.handle if rank0 else None, cfg.batch_timeout)
        control.start()
        engine = starting.result()
        outbox.engine_started(engine is not None, stats.engine_start_s, stats.engine_failed)
        if engine is not None:
            sink = node.output.sink(plan.rank, outbox.put)
            GenerationLoop(cfg, engine, claims, index, node.prompts, outbox, peers, sink, plan.rank, stats,
                           len(batches), order).run()
            if not keep_engine or outbox.state == RankState.GAVE_UP:
                world.engines.release()
        outbox.put(stats)
        outbox.finish()
        control.wait_done()
        peers.raise_if_stopped(stats.engine_failed, len(batches), plan.is_rank0)  # no rank could run, or drained
        if rank0:
            rank0.finish(world.drain, control.stats)
    except (Exception, KeyboardInterrupt) as e:
        if starting is not None:
            starting.abandon()  # nothing of the engine's start after this rank's error line
        if control is not None:
            control.leaving(e)  # for the other ranks to say why this one left
        if rank0:
            rank0.stopped(e)  # the live status says so
        raise
    finally:
        scanners.close()
        if index is not None:
            index.close()
        if rank0:
            rank0.close()
