"""Starting the rank's engine, and keeping it from one workflow node to the next when the next would start the same one."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from typing import Callable, Optional

from spmd_dp.config import task_list
from spmd_dp.engines import build_engine
from spmd_dp.engines.base import EngineStartError
from spmd_dp.engines.supervisor import SupervisedEngine
from spmd_dp.log import logger


def engine_key(cfg, device_ids) -> str:
    """Nodes with the same key can share one engine (consecutive workflow nodes on one model)."""
    eo = {k: v for k, v in asdict(cfg.engine_options).items() if not k.startswith("dp_")}
    return json.dumps([cfg.inference_engine, cfg.model_name, eo, list(device_ids), task_list(cfg.task)],
                      sort_keys=True, default=str)


class EngineCache:
    def __init__(self) -> None:
        self.key: Optional[str] = None
        self.engine: Optional[SupervisedEngine] = None
        self.closing: Optional[threading.Thread] = None

    def start(self, cfg, device, rank: int, kv_budget: Optional[float], stats,
              quiet: Callable[[], bool] = lambda: False) -> Optional[SupervisedEngine]:
        """This rank's engine for the node (kept from the previous node when it is the same), supervised (a
        dead one is restarted on the slice), or None if it cannot start: the rank then stays in the control
        plane with no work, and the others do its share. quiet(): the rank has stopped meanwhile (say nothing)."""
        key = engine_key(cfg, device.ids)
        kept = self.engine is not None and self.key == key
        t0 = time.monotonic()
        if not kept:
            self.close()
            try:
                self.engine = SupervisedEngine(lambda attempt: build_engine(cfg, device, rank, kv_budget, attempt),
                                               rank, device.describe(), cfg.engine_options.max_engine_restarts,
                                               cfg.batch_timeout)
                self.key = key
            except EngineStartError as e:
                stats.engine_failed = str(e)
                if not quiet():
                    logger.error("engine failed to start on rank %d: %s; this rank takes no work", rank, e)
                return None
            finally:
                stats.engine_start_s = round(time.monotonic() - t0, 3)
        if not quiet():
            logger.info("Worker rank %d is ready (engine %s in %.1fs)", rank, "kept" if kept else "started",
                        stats.engine_start_s)
        self.engine.stall_s = cfg.batch_timeout
        return self.engine

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
