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
from spmd_dp.engines.base import Completion, Engine, EngineFailure, EngineGaveUp, EngineStartError, Request


def set_engine_environment() -> None:
    """What every engine of the run sees: quiet logs (VLLM_LOGGING_LEVEL=INFO to debug; vLLM's known-harmless
    warnings: spmd_dp/engines/quiet.py). Only variables vLLM knows (vLLM 0.32 has only its V1 engine: no VLLM_USE_V1)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def build_engine(cfg, device_slice, rank: int, kv_budget: Optional[float] = None, attempt: int = 0) -> Engine:
    """Start the engine of `cfg.inference_engine` on this rank's device slice: one per task of `cfg.task`
    (vLLM runs one task per model instance; task=[generate,embed] starts two, sharing the slice).
    attempt: 0, then 1, 2, ... when the rank's supervisor restarts it (engines/supervisor.py)."""
    if cfg.inference_engine == "echo":
        from spmd_dp.engines.echo import EchoEngine

        return EchoEngine(cfg.engine_options, cfg.batch_size, rank, attempt)
    from spmd_dp.engines.vllm_engine import VllmEngine, engine_kwargs

    # tasks that need the same engine share it (classify and reward: the pooling runner's classify)
    groups: Dict[str, List[str]] = {}
    for task in task_list(cfg.task):
        key = json.dumps(engine_kwargs(cfg, device_slice, task), sort_keys=True, default=str)
        groups.setdefault(key, []).append(task)
    if len(groups) == 1:
        return VllmEngine(cfg, device_slice, kv_budget, task_list(cfg.task)[0])
    engines: List[Engine] = []
    try:
        for tasks in groups.values():
            engines.append(VllmEngine(cfg, device_slice, kv_budget, tasks[0], share=len(groups)))
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return TaskEngines({task: engine for tasks, engine in zip(groups.values(), engines) for task in tasks})


class TaskEngines:
    """Several engines on one rank (vLLM runs one runner per model instance): a request goes to its task's."""

    def __init__(self, by_task: Dict[str, Engine]) -> None:
        self.by_task = by_task
        self.engines = list({id(e): e for e in by_task.values()}.values())
        self.capacity = sum(e.capacity for e in self.engines)
        kv = [e.kv_tokens for e in self.engines]
        self.kv_tokens = None if None in kv else sum(kv)
        self.pending = [0] * len(self.engines)  # requests in each engine (vLLM's step blocks when it has none)

    def add(self, request: Request) -> Optional[Completion]:
        engine = self.by_task[request.task]
        rejected = engine.add(request)
        if rejected is None:
            self.pending[self.engines.index(engine)] += 1
        return rejected

    def step(self) -> List[Completion]:
        done: List[Completion] = []
        for i, engine in enumerate(self.engines):
            if self.pending[i]:
                finished = engine.step()
                self.pending[i] -= len(finished)
                done += finished
        return done

    def close(self) -> None:
        for engine in self.engines:
            engine.close()


__all__ = ["Completion", "Engine", "EngineFailure", "EngineGaveUp", "EngineStartError", "Request", "TaskEngines",
           "build_engine",
           "set_engine_environment"]
