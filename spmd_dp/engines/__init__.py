"""Inference engines behind one small interface (`Engine`): add requests, step, collect.

`vllm_dp` is real vLLM (`vllm.LLM`'s engine fed request by request, so it stays
full across batch boundaries); `echo` is a deterministic dry run with no vLLM
import, for validating a pipeline, for tests and for benchmarks.
"""

from __future__ import annotations

import os
from typing import Optional

from spmd_dp.engines.base import Completion, Engine, EngineFailure, EngineGaveUp, EngineStartError, Request


def set_engine_environment() -> None:
    """What every engine of the run sees: vLLM V1 (seed 000), quiet logs (VLLM_LOGGING_LEVEL=INFO to debug)."""
    os.environ["VLLM_USE_V1"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def build_engine(cfg, device_slice, rank: int, kv_budget: Optional[float] = None, attempt: int = 0) -> Engine:
    """Start the engine of `cfg.inference_engine` on this rank's device slice (attempt: 0, then restarts)."""
    if cfg.inference_engine == "echo":
        from spmd_dp.engines.echo import EchoEngine

        return EchoEngine(cfg.engine_options, cfg.batch_size, rank, attempt)
    from spmd_dp.engines.vllm_engine import VllmEngine

    return VllmEngine(cfg, device_slice, kv_budget)


__all__ = ["Completion", "Engine", "EngineFailure", "EngineGaveUp", "EngineStartError", "Request", "build_engine",
           "set_engine_environment"]
