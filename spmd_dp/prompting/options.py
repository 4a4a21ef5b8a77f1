"""What a record asks of the engine besides its prompt: sampling, structured outputs, logprobs, the task,
the LoRA adapter, pooling options, and what to do when the prompt does not fit the context.

Each option has a config key (all records) and a record field of the same name (that record):

  generation_options  SamplingParams fields, merged over the config's (structured_outputs, logprobs, ...)
  task                generate | embed | classify | score | reward: read when the run has several (task=[...])
  lora_adapter        a name in engine_options.lora_adapters (null: the base model); any other name is a bad record
  pooling_options     PoolingParams fields (dimensions, use_activation), merged over the config's
  on_long_prompt      fail | skip | truncate_left | truncate_right
  clamp_max_tokens    true: max_tokens is lowered to what the context leaves after the prompt
  max_retries         requests the engine failed are tried again this many times

`RequestOptions.check` validates a record's options during the input scan (a schema that does not compile
is found there: spmd_dp/prompting/structured.py); `RequestOptions.request` makes the engine `Request`.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from typing import Any, Dict, Optional

from spmd_dp.prompting import structured
from spmd_dp.config import LORA_PROMPT_LOGPROBS, GenerationOptions, RunConfig, task_list
from spmd_dp.config.schema import ON_LONG_PROMPT, POOLING_OPTIONS
from spmd_dp.engines.base import Request
from spmd_dp.errors import UsageError

SAMPLING = "generation_options"
SAMPLING_FIELDS = {f.name for f in fields(GenerationOptions)} - {"extra"}


class RequestOptions:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.tasks = task_list(cfg.task)
        self.read_task = len(self.tasks) > 1 or cfg.input_format == "openai_batch"  # else 'task' is user data
        self.adapters = dict(cfg.engine_options.lora_adapters)
        self.sampling_fields = SAMPLING_FIELDS | set(cfg.generation_options.extra)
        so = cfg.generation_options.structured_outputs
        why = structured.problem(so) if so else None
        if why is not None:
            raise UsageError(f"config error: generation_options.structured_outputs: {why}; fix the constraint")

    def task(self, record: Dict[str, Any]) -> str:
        return record.get("task", self.tasks[0]) if self.read_task else self.tasks[0]

    def check(self, record: Dict[str, Any]) -> Optional[str]:
        """Why the record's own options are not valid, or None."""
        opts = record.get(SAMPLING)
        if opts is not None:
            if not isinstance(opts, dict):
                return f"'{SAMPLING}' must be an object, got {type(opts).__name__}"
            unknown = sorted(set(opts) - self.sampling_fields)
            if unknown:
                return f"'{SAMPLING}' has unknown fields {unknown}; allowed: {sorted(self.sampling_fields)}"
            for k in ("logprobs", "prompt_logprobs"):
                if opts.get(k) is not None and not _is_int(opts[k], 0):
                    return f"'{SAMPLING}.{k}' must be an integer >= 0, got {opts[k]!r}"
            if opts.get("prompt_logprobs") is not None and self.adapters:
                return LORA_PROMPT_LOGPROBS
            if opts.get("structured_outputs") is not None:
                why = structured.problem(opts["structured_outputs"])
                if why is not None:
                    return f"'{SAMPLING}.structured_outputs': {why}"
        task = record.get("task")
        if self.read_task and task is not None and task not in self.tasks:
            return (f"the request needs task={task}; this run serves task={self.tasks}: set "
                    f"task=[{','.join(self.tasks + [str(task)])}] (one engine per task)")
        adapter = record.get("lora_adapter")
        if adapter is not None and adapter not in self.adapters:  # also with none configured: never the base model
            if not self.adapters:
                return (f"'lora_adapter' is {adapter!r} but no adapter is configured; name it: "
                        f"+engine_options.lora_adapters.{adapter}=<folder or hub id> (or drop the field)")
            return (f"'lora_adapter' is {adapter!r}, not one of engine_options.lora_adapters "
                    f"({', '.join(sorted(self.adapters))})")
        pooling = record.get("pooling_options")
        if pooling is not None and not (isinstance(pooling, dict) and set(pooling) <= set(POOLING_OPTIONS)):
            return f"'pooling_options' must be an object with fields among {list(POOLING_OPTIONS)}"
        if "on_long_prompt" in record and record["on_long_prompt"] not in ON_LONG_PROMPT:
            return f"'on_long_prompt' is {record['on_long_prompt']!r}; use one of {', '.join(ON_LONG_PROMPT)}"
        if "clamp_max_tokens" in record and not isinstance(record["clamp_max_tokens"], bool):
            return "'clamp_max_tokens' must be true or false"
        if "max_retries" in record and not _is_int(record["max_retries"], 0):
            return f"'max_retries' must be an integer >= 0, got {record['max_retries']!r}"
        return None

    def request(self, request_id: str, record: Dict[str, Any], prompt: Any, base: Dict[str, Any]) -> Request:
        """The engine request of a checked record: its options over the config's (`base`: SamplingParams)."""
        cfg = self.cfg
        opts = record.get(SAMPLING)
        sampling = {**base, **opts} if opts else dict(base)
        if not sampling.get("structured_outputs"):
            sampling.pop("structured_outputs", None)
        task = self.task(record)
        seed = sampling.pop("seed", None)
        if seed is not None and task == "generate":
            sampling["seed"] = record_seed(seed, record[cfg.primary_key])
        lora = record.get("lora_adapter", cfg.lora_adapter) if self.adapters else None
        return Request(
            request_id, prompt, sampling, task=task,
            pooling={**cfg.pooling_options, **(record.get("pooling_options") or {})},
            lora=lora,
            on_long_prompt=record.get("on_long_prompt", cfg.on_long_prompt),
            clamp_max_tokens=record.get("clamp_max_tokens", cfg.clamp_max_tokens),
            max_retries=record.get("max_retries", cfg.max_retries),
            key=record.get(cfg.primary_key))


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def sampling_kwargs(cfg: RunConfig, rank: int) -> Dict[str, Any]:
    """A rank's SamplingParams keyword arguments (null fields left out; `seed` becomes each record's own)."""
    go = cfg.generation_options
    out = {k: v for k, v in vars(go).items() if k != "extra" and v is not None and v != {}}
    out.update(go.extra)
    out.update(cfg.generation_options_per_rank.get(str(rank), {}))
    return out


def record_seed(seed: int, key: Any) -> int:
    """A per-record sampling seed that depends only on the run's seed and the record's key."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
