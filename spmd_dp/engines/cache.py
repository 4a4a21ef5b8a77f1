"""The rank's engine, kept from one workflow node to the next when the next would start the same one."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from typing import Callable, Optional, Tuple

from spmd_dp.engines.base import Engine


def engine_key(cfg, device_ids) -> str:
    """Nodes with the same key can share one engine (consecutive workflow nodes on one model)."""
    eo = {k: v for k, v in asdict(cfg.engine_options).items() if not k.startswith("dp_")}
    return json.dumps([cfg.inference_engine, cfg.model_name, eo, list(device_ids)], sort_keys=True, default=str)


class EngineCache:
    def __init__(self) -> None:
        self.key: Optional[str] = None
        self.engine: Optional[Engine] = None
        self.closing: Optional[threading.Thread] = None

    def get(self, key: str, build: Callable[[], Engine]) -> Tuple[Engine, bool]:
        """The engine for `key` and whether it was kept from the previous node (else `build()` starts it)."""
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
