"""One rank's preflight of a workflow node (`preflight=true`): what run.py's run_node does up to the engine, then
counting and timing instead of the work.

  device slice, engine start (a thread) while every rank scans its share of the input (the run's own scan: a bad
  input is the same exit 2) -> each rank counts the prompt tokens of its share of the records (tokens.py); the
  counts are all-gathered (an error on any rank stops all with its line) and the sampled lengths gathered to
  rank 0 -> each rank times its engine on its sample (calibrate.py) and leaves the result in the store -> rank 0
  waits for every rank's (bounded), projects (project.py), writes ${name}.preflight.json and prints the summary.

Nothing else is written: no journal, no config.yaml, no status.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import numpy as np

from spmd_dp.control.claims import balanced_split
from spmd_dp.control.comm import make_group, substore
from spmd_dp.control.messages import RankStats
from spmd_dp.engines.starting import EngineStart
from spmd_dp.errors import UsageError
from spmd_dp.launch.devices import agree_kv_budget
from spmd_dp.launch.launcher import scrub_launcher_env
from spmd_dp.log import logger
from spmd_dp.node import Node, fork_scanners, scan_node
from spmd_dp.output.files import atomic_write
from spmd_dp.preflight.calibrate import calibrate, sample_positions
from spmd_dp.preflight.report import build_report, summary
from spmd_dp.preflight.tokens import Tokens, count_share
from spmd_dp.prompting.options import sampling_kwargs

ENGINE_FULLS = 2  # the default sample: this many engine-fulls a rank


def preflight_node(node: Node, world, store) -> None:
    """`world`: run.py's World (its engines, the collectives' bound); `store`: the node's namespace."""
    cfg, plan = node.cfg, node.plan
    t_start = time.monotonic()
    group = make_group(substore(store, "setup"), plan.rank, plan.world_size, world.timeout, plan.is_rank0)
    plan.device.apply()
    os.environ["VLLM_PORT"] = str(plan.vllm_port)
    stats = RankStats(plan.rank)
    kv_budget = agree_kv_budget(plan.device, cfg.engine_options, plan.env.local_world_size, plan.world_size,
                                group.min) if cfg.engine_options.agree_kv_cache else None
    scrub_launcher_env()
    scanners = fork_scanners(node)
    starting = EngineStart(world.engines, cfg, plan.device, plan.rank, kv_budget, stats)
    index = None
    try:
        try:
            scanned = scan_node(node, group, scanners)
        except UsageError as e:
            raise UsageError(str(e), quiet=not plan.is_rank0) from None
        scanners.close()
        index = scanned.index
        n = index.n_records
        sampling = sampling_kwargs(cfg, plan.rank)

        # prompt tokens: every rank a contiguous share of the records; the sample every `every`-th record
        every = max(1, -(-n // cfg.preflight.token_sample))
        share = None
        try:
            tokens = Tokens(cfg)
            share = count_share(index, node.prompts, sampling, balanced_split(n, plan.world_size)[plan.rank], tokens,
                                every)
            mine = {"share": share.to_json(), "limit": tokens.limit, "limit_source": tokens.limit_source,
                    "tokenizer": tokens.describe}
        except UsageError as e:
            mine = {"error": str(e)}
        shares = [json.loads(b) for b in group.all_gather_bytes(json.dumps(mine).encode())]
        first_error = next((s["error"] for s in shares if "error" in s), None)
        if first_error:
            raise UsageError(first_error, quiet=not plan.is_rank0)  # rank 0 says the first rank's line
        lengths = group.gather_bytes(share.lengths.tobytes())
        logger.info("preflight: rank %d counted the prompts of %d records in %.1f s (%d tokenized)", plan.rank,
                    share.records, share.seconds, share.tokenized)

        # the engine, timed on this rank's sample
        engine = starting.result()
        if engine is None:
            cal = {"rank": plan.rank, "error": stats.engine_failed}
        else:
            k = cfg.preflight.sample_records or ENGINE_FULLS * int(engine.capacity)
            cal = calibrate(engine, index, node.prompts, sampling, sample_positions(n, k, plan.rank, plan.world_size),
                            cfg.batch_timeout, plan.rank, shares[0]["limit"])
            logger.info("preflight: rank %d ran %d sample records in %.1f s (%d output tokens)", plan.rank,
                        cal["records"], cal["seconds"], cal["output_tokens"])
        cal["engine_start_s"] = stats.engine_start_s
        results = substore(store, "preflight")
        results.set(f"cal/{plan.rank}", json.dumps(cal))
        if not plan.is_rank0:
            return
        keys = [f"cal/{r}" for r in range(plan.world_size)]
        try:  # the slowest engine start bounds it: twice the collectives' bound
            results.wait(keys, timedelta(seconds=2 * world.timeout.total_seconds()))
        except Exception as e:
            raise UsageError(f"preflight: not every rank timed its engine within {2 * world.timeout.total_seconds():.0f}"
                             f" s ({type(e).__name__}); raise batch_timeout") from None
        cals = [json.loads(results.get(k)) for k in keys]
        sample = np.concatenate([np.frombuffer(b, dtype=np.uint32) for b in lengths]) if lengths else \
            np.zeros(0, np.uint32)
        report = build_report(node, scanned, shares, sample, every, cals, time.monotonic() - t_start)
        node.output.paths.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(node.output.paths.preflight, [json.dumps(report, indent=1).encode() + b"\n"])
        print(summary(report), flush=True)
        logger.info("preflight: wrote %s", node.output.paths.preflight)
    except BaseException:
        starting.abandon()  # nothing of the engine's start after this rank's error line
        raise
    finally:
        scanners.close()
        if index is not None:
            index.close()
