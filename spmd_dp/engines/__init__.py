"""Inference engines behind one small interface (`Engine`): add requests, step, collect.

`vllm_dp` is real vLLM (`vllm.LLM`'s engine fed request by request, so it stays
full across batch boundaries); `echo` is a deterministic dry run with no vLLM
import, for validating a pipeline, for tests and for benchmarks.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from spmd_dp.config import task_list
from spmd_dp.engines.base import Completion, Engine, EngineStartError, Request


def set_engine_environment() -> None:
    """What every engine of the run sees: vLLM V1 (seed 000), quiet logs (VLLM_LOGGING_LEVEL=INFO to debug)."""
    os.environ["VLLM_USE_V1"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def build_engine(cfg, device_slice, rank: int, kv_budget: Optional[float] = None) -> Engine:
    """Start the engine of `cfg.inference_engine` on this rank's device slice: one per task of `cfg.task`
    (vLLM runs one task per model instance; task=[generate,embed] starts two, sharing the slice)."""
    if cfg.inference_engine == "echo":
        from spmd_dp.engines.echo import EchoEngine

        return EchoEngine(cfg.engine_options, cfg.batch_size, rank)
    from spmd_dp.engines.vllm_engine import VllmEngine

    tasks = task_list(cfg.task)
    if len(tasks) == 1:
        return VllmEngine(cfg, device_slice, kv_budget, tasks[0])
    engines: Dict[str, Engine] = {}
    try:
        for task in tasks:
            engines[task] = VllmEngine(cfg, device_slice, kv_budget, task, share=len(tasks))
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return TaskEngines(engines)


class TaskEngines:
    """Several engines on one rank, one per task: a request goes to its task's engine."""

    def __init__(self, engines: Dict[str, Engine]) -> None:
        self.engines = engines
        self.capacity = sum(e.capacity for e in engines.values())
        kv = [e.kv_tokens for e in engines.values()]
        self.kv_tokens = None if None in kv else sum(kv)

        self.pending = {task: 0 for task in engines}  # requests in each engine (vLLM's step blocks when idle)

    def add(self, request: Request) -> Optional[Completion]:
        rejected = self.engines[request.task].add(request)
        if rejected is None:
            self.pending[request.task] += 1
        return rejected

    def step(self) -> List[Completion]:
        done: List[Completion] = []
        for task, engine in self.engines.items():
            if self.pending[task]:
                finished = engine.step()
                self.pending[task] -= len(finished)
                done += finished
        return done

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


__all__ = ["Completion", "Engine", "EngineStartError", "Request", "TaskEngines", "build_engine",
           "set_engine_environment"]
