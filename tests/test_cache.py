"""The engine kept from one workflow node to the next (spmd_dp/engines/cache.py), with the echo engine: the same
engine for a node that would start the same one, a new one (the old closed) otherwise, a start that fails leaves
the rank with no work and says why, and a rank done with its work frees its engine at once."""

import logging

from spmd_dp.config import load_config
from spmd_dp.control.messages import RankStats
from spmd_dp.engines.cache import EngineCache, engine_key
from spmd_dp.launch.devices import DeviceSlice

NO_DEVICE = DeviceSlice("cpu", (), 1)


def cfg(*overrides):
    return load_config(["inference_engine=echo", *overrides])


def test_nodes_that_would_start_the_same_engine_share_it(caplog):
    caplog.set_level(logging.INFO, logger="spmd_dp")
    cache = EngineCache()
    first = cache.start(cfg("name=a"), NO_DEVICE, 0, None, RankStats(0))
    kept = cache.start(cfg("name=b", "batch_timeout=9"), NO_DEVICE, 0, None, RankStats(0))  # not engine options
    assert kept is first and kept.stall_s == 9  # the node's own batch_timeout still applies
    assert "engine kept in" in caplog.text
    other = cache.start(cfg("engine_options.max_model_len=99"), NO_DEVICE, 0, None, RankStats(0))
    assert other is not first and first.engine.closed.is_set()  # the old one was closed
    cache.close()
    assert cache.engine is None


def test_the_engine_key_is_what_starts_an_engine():
    base = engine_key(cfg(), ("0",))
    assert engine_key(cfg("name=x", "batch_size=7", "engine_options.dp_master_port=1234"), ("0",)) == base
    assert engine_key(cfg(), ("1",)) != base  # another device slice
    assert engine_key(cfg("model_name=other"), ("0",)) != base
    assert engine_key(cfg("task=embed"), ("0",)) != base


def test_a_start_that_fails_leaves_the_rank_with_no_work(caplog):
    stats = RankStats(1)
    cache = EngineCache()
    assert cache.start(cfg("engine_options.echo_fail_ranks=[1]"), NO_DEVICE, 1, None, stats) is None
    assert "listed in engine_options.echo_fail_ranks" in stats.engine_failed and stats.engine_start_s >= 0
    assert "engine failed to start on rank 1" in caplog.text and "this rank takes no work" in caplog.text
    assert cache.engine is None and cache.key is None


def test_release_frees_the_engine_while_the_others_finish():
    cache = EngineCache()
    engine = cache.start(cfg("engine_options.echo_start_s=0.2"), NO_DEVICE, 0, None, RankStats(0))
    inner = engine.engine
    cache.release()  # closed on a thread: returns at once
    assert cache.engine is None and cache.key is None
    cache.close()  # waits for that close (bounded)
    assert inner.closed.is_set() and cache.closing is None
    again = cache.start(cfg("engine_options.echo_start_s=0.2"), NO_DEVICE, 0, None, stats := RankStats(0))
    assert again is not engine and stats.engine_start_s >= 0.2  # nothing kept after a release
    cache.close()
