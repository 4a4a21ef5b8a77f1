"""Checking a loaded config: every value against what it may be, one line naming the key and the fix. Checks
only (a resolved config in, nothing changed); what needs the launcher's environment (WORLD_SIZE, GPUs) is the
plan's (spmd_dp/plan.py)."""

from __future__ import annotations

from typing import Any, Optional

from spmd_dp.config.schema import (DEFAULT_MODEL, DEVICES, ECHO_FAULTS, ENGINES, INPUT_FORMATS, ON_BAD_RECORD,
                                   ON_LONG_PROMPT, OUTPUT_FORMATS, OUTPUT_MODES, POOLING_OPTIONS, SCHEDULES,
                                   STRUCTURED_KINDS, STRUCTURED_OPTIONS, TASKS, GenerationOptions, RunConfig,
                                   task_list)
from spmd_dp.errors import UsageError


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UsageError(f"config error: {key}={value!r} is not allowed; {allowed}")


def validate(cfg: RunConfig) -> None:
    """Checks that need no environment (WORLD_SIZE and GPUs are checked by the plan)."""
    eo, go = cfg.engine_options, cfg.generation_options
    _check(bool(cfg.name) and "/" not in cfg.name, "name", cfg.name, "use a non-empty file name (no '/')")
    _check(cfg.inference_engine in ENGINES, "inference_engine", cfg.inference_engine, f"use one of {', '.join(ENGINES)}")
    _check(cfg.schedule in SCHEDULES, "schedule", cfg.schedule, f"use one of {', '.join(SCHEDULES)}")
    _check(isinstance(cfg.prefix_affinity, bool) or cfg.prefix_affinity == "auto", "prefix_affinity",
           cfg.prefix_affinity, "use auto (group records that share a prompt prefix when it pays), true or false")
    _check(cfg.prefix_field is None or (isinstance(cfg.prefix_field, str) and bool(cfg.prefix_field)), "prefix_field",
           cfg.prefix_field, "name the field whose value groups records (e.g. prefix_field=doc_id), or leave it unset")
    _check(cfg.prefix_field is None or cfg.prefix_affinity is not False, "prefix_field", cfg.prefix_field,
           "prefix_field groups records, which prefix_affinity=false turns off: set one of them only")
    _check(cfg.output_format in OUTPUT_FORMATS, "output_format", cfg.output_format, f"use one of {', '.join(OUTPUT_FORMATS)}")
    _check(cfg.output_mode in OUTPUT_MODES, "output_mode", cfg.output_mode,
           f"use one of {', '.join(OUTPUT_MODES)} (sharded: every rank writes its own batches; see the README)")
    _check(not cfg.merge or cfg.output_mode == "sharded", "merge", cfg.merge,
           "merge=true joins the shards of output_mode=sharded into one file; single mode writes one file already")
    _check(cfg.on_bad_record in ON_BAD_RECORD, "on_bad_record", cfg.on_bad_record, f"use one of {', '.join(ON_BAD_RECORD)}")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "use an integer >= 1 (the seed's default is 32)")
    _check(cfg.batch_timeout > 0, "batch_timeout", cfg.batch_timeout, "use seconds > 0 (the seed's default is 600.0)")
    _check(bool(cfg.primary_key), "primary_key", cfg.primary_key, "name the field that identifies a record, e.g. id")
    paths = cfg.input_data_path if isinstance(cfg.input_data_path, list) else [cfg.input_data_path]
    _check(bool(paths) and all(isinstance(p, str) and p for p in paths), "input_data_path", cfg.input_data_path,
           "give a file, a folder, a glob or a URL, or a list of them: input_data_path=[a.jsonl,shards/*.parquet]")
    _check(bool(cfg.prompt_field), "prompt_field", cfg.prompt_field, "name the field that holds the prompt, e.g. prompt")
    _check(bool(cfg.model_name), "model_name", cfg.model_name, f"give a hub id, a local path or {DEFAULT_MODEL}")
    _check(eo.gpus_per_dp_rank >= 1, "engine_options.gpus_per_dp_rank", eo.gpus_per_dp_rank, "use an integer >= 1")
    _check(eo.data_parallel_size is None or eo.data_parallel_size >= 1, "engine_options.data_parallel_size",
           eo.data_parallel_size, "use null (= WORLD_SIZE) or the number of ranks torchrun starts")
    _check(eo.dp_master_port is None or 0 < eo.dp_master_port < 65536, "engine_options.dp_master_port",
           eo.dp_master_port, "use null (chosen for you) or a port in 1..65535")
    _check(0 < eo.gpu_memory_utilization <= 1, "engine_options.gpu_memory_utilization", eo.gpu_memory_utilization,
           "use a fraction in (0, 1], e.g. 0.9")
    _check(eo.max_model_len is None or eo.max_model_len >= 1, "engine_options.max_model_len", eo.max_model_len,
           "use null (the model's) or an integer >= 1")
    _check(eo.max_num_seqs is None or eo.max_num_seqs >= 1, "engine_options.max_num_seqs", eo.max_num_seqs,
           "use null (vLLM's default) or an integer >= 1")
    _check(eo.limit_mm_per_prompt is None or eo.limit_mm_per_prompt >= 0, "engine_options.limit_mm_per_prompt",
           eo.limit_mm_per_prompt, "use null (the model's limit) or the number of images a prompt may hold, e.g. 4")
    _check(cfg.image_field is None or (isinstance(cfg.image_field, str) and bool(cfg.image_field)), "image_field",
           cfg.image_field, "name the record field that holds the images, e.g. image_field=image (null: none)")
    _check(eo.device in DEVICES, "engine_options.device", eo.device, f"use one of {', '.join(DEVICES)}")
    _check(eo.cpu_cores_per_dp_rank is None or eo.cpu_cores_per_dp_rank >= 1, "engine_options.cpu_cores_per_dp_rank",
           eo.cpu_cores_per_dp_rank, "use null or an integer >= 1")
    _check(eo.cpu_kvcache_space_gib is None or eo.cpu_kvcache_space_gib > 0, "engine_options.cpu_kvcache_space_gib",
           eo.cpu_kvcache_space_gib, "use null or a whole number of GiB >= 1")
    _check(cfg.drain_timeout >= 0, "drain_timeout", cfg.drain_timeout, "use seconds >= 0 (default 20.0)")
    _check(eo.max_engine_restarts >= 0, "engine_options.max_engine_restarts", eo.max_engine_restarts,
           "use an integer >= 0 (0: a rank whose engine fails mid-run hands its work to the others at once)")
    _check(eo.echo_delay_s >= 0, "engine_options.echo_delay_s", eo.echo_delay_s, "use seconds >= 0")
    _check(eo.echo_start_s >= 0, "engine_options.echo_start_s", eo.echo_start_s, "use seconds >= 0")
    _check(all(r >= 0 for r in eo.echo_start_ranks), "engine_options.echo_start_ranks", eo.echo_start_ranks,
           "list ranks (>= 0) whose echo engine takes echo_start_s to start, e.g. [1]; [] for all")
    _check(eo.echo_fault in ECHO_FAULTS, "engine_options.echo_fault", eo.echo_fault, f"use one of {', '.join(ECHO_FAULTS)}")
    _check(eo.echo_fault_after_steps >= 0, "engine_options.echo_fault_after_steps", eo.echo_fault_after_steps,
           "use an integer >= 0")
    _check(eo.echo_fault_times >= 1, "engine_options.echo_fault_times", eo.echo_fault_times,
           "use an integer >= 1 (more than max_engine_restarts: the rank gives up)")
    _check(go.max_tokens >= 1, "generation_options.max_tokens", go.max_tokens, "use an integer >= 1")
    _check(go.n >= 1, "generation_options.n", go.n, "use an integer >= 1")
    _check(go.temperature is None or go.temperature >= 0, "generation_options.temperature", go.temperature,
           "use a float >= 0 (0 = greedy)")
    _check(go.top_p is None or 0 < go.top_p <= 1, "generation_options.top_p", go.top_p, "use a float in (0, 1]")
    _check(go.logprobs is None or go.logprobs >= 0, "generation_options.logprobs", go.logprobs,
           "use null or an integer k >= 0 (the k most likely tokens per generated token)")
    _check(go.prompt_logprobs is None or go.prompt_logprobs >= 0, "generation_options.prompt_logprobs",
           go.prompt_logprobs, "use null or an integer k >= 0")
    if go.structured_outputs:
        why = structured_outputs_problem(go.structured_outputs, allow_file=True)
        _check(why is None, "generation_options.structured_outputs", go.structured_outputs, why or "")
    tasks = task_list(cfg.task)
    _check(bool(tasks) and all(t in TASKS for t in tasks) and len(set(tasks)) == len(tasks), "task", cfg.task,
           f"use one of {', '.join(TASKS)}, or a list of them, e.g. task=[generate,embed]")
    _check(cfg.input_format in INPUT_FORMATS, "input_format", cfg.input_format, f"use one of {', '.join(INPUT_FORMATS)}")
    if cfg.input_format == "openai_batch":
        _check(cfg.primary_key == "custom_id", "primary_key", cfg.primary_key,
               "OpenAI batch files are keyed by custom_id: leave primary_key unset")
        _check(cfg.output_format == "jsonl", "output_format", cfg.output_format,
               "OpenAI batch output files are JSONL: use output_format=jsonl with input_format=openai_batch")
    _check(cfg.on_long_prompt in ON_LONG_PROMPT, "on_long_prompt", cfg.on_long_prompt,
           f"use one of {', '.join(ON_LONG_PROMPT)}")
    _check(cfg.max_retries >= 0, "max_retries", cfg.max_retries, "use an integer >= 0")
    _check(bool(cfg.document_field), "document_field", cfg.document_field, "name the field of a score task's second text")
    unknown_pool = sorted(set(cfg.pooling_options) - set(POOLING_OPTIONS))
    _check(not unknown_pool, "pooling_options", unknown_pool, f"use vLLM PoolingParams fields: {', '.join(POOLING_OPTIONS)}")
    for name, where in eo.lora_adapters.items():
        _check(bool(name) and isinstance(where, str) and bool(where), "engine_options.lora_adapters", {name: where},
               "map a name to a folder, e.g. +engine_options.lora_adapters.pirate=/adapters/pirate")
    _check(cfg.lora_adapter is None or cfg.lora_adapter in eo.lora_adapters, "lora_adapter", cfg.lora_adapter,
           f"name one of engine_options.lora_adapters ({', '.join(eo.lora_adapters) or 'none set'}) or null")
    _check(eo.max_lora_rank is None or eo.max_lora_rank >= 1, "engine_options.max_lora_rank", eo.max_lora_rank,
           "use null (read from the adapters) or an integer >= 1")
    _check(eo.echo_fail_times >= 0, "engine_options.echo_fail_times", eo.echo_fail_times, "use an integer >= 0")
    if eo.lora_adapters and (go.prompt_logprobs is not None):
        _check(False, "generation_options.prompt_logprobs", go.prompt_logprobs, LORA_PROMPT_LOGPROBS)
    if eo.max_model_len is not None and cfg.on_long_prompt.startswith("truncate"):
        _check(go.max_tokens < eo.max_model_len, "generation_options.max_tokens", go.max_tokens,
               f"on_long_prompt={cfg.on_long_prompt} keeps max_model_len - max_tokens prompt tokens: use "
               f"max_tokens < engine_options.max_model_len={eo.max_model_len}")
    pf = cfg.preflight
    _check(pf.sample_records is None or pf.sample_records >= 1, "preflight.sample_records", pf.sample_records,
           "use null (two engine-fulls a rank) or an integer >= 1")
    _check(pf.token_sample >= 1, "preflight.token_sample", pf.token_sample, "use an integer >= 1")
    _check(pf.gpu_hour_price is None or pf.gpu_hour_price >= 0, "preflight.gpu_hour_price", pf.gpu_hour_price,
           "use null or a price >= 0 (per GPU-hour)")
    _check(cfg.metrics_port is None or 0 <= cfg.metrics_port < 65536, "metrics_port", cfg.metrics_port,
           "use null (no metrics server), 0 (any free port) or a port in 1..65535")
    fields = [f for f in GenerationOptions.__dataclass_fields__ if f != "extra"]
    overlap = set(go.extra) & set(fields)
    _check(not overlap, "generation_options.extra", sorted(overlap), "set these fields directly under generation_options")
    for rank, opts in cfg.generation_options_per_rank.items():
        _check(rank.isdigit(), "generation_options_per_rank", rank, "key it by rank number, e.g. +generation_options_per_rank.1.max_tokens=16")
        unknown = sorted(set(opts) - set(fields) - set(go.extra))
        _check(not unknown, f"generation_options_per_rank.{rank}", unknown, f"use generation_options fields: {', '.join(fields)}")


LORA_PROMPT_LOGPROBS = ("vLLM 0.32 cannot give prompt_logprobs with LoRA adapters enabled (its LoRA logits layer "
                        "fails: measured on CPU); run such records without engine_options.lora_adapters")


def structured_outputs_problem(spec: Any, allow_file: bool = False) -> Optional[str]:
    """Why `spec` is not a StructuredOutputsParams object (shape only; compiling it: spmd_dp/prompting/structured.py)."""
    if not isinstance(spec, dict):
        return f"give an object with one of {', '.join(STRUCTURED_KINDS)}, e.g. {{\"choice\": [\"yes\", \"no\"]}}"
    unknown = sorted(set(spec) - set(STRUCTURED_KINDS) - set(STRUCTURED_OPTIONS))
    if unknown:
        return f"unknown fields {unknown}; use one of {', '.join(STRUCTURED_KINDS)} (+ {', '.join(STRUCTURED_OPTIONS)})"
    kinds = [k for k in STRUCTURED_KINDS if spec.get(k) is not None]
    if len(kinds) != 1:
        return f"give exactly one of {', '.join(STRUCTURED_KINDS)} (got {kinds or 'none'})"
    kind, value = kinds[0], spec[kinds[0]]
    if kind == "json" and not (isinstance(value, dict) or (isinstance(value, str) and value.strip())):
        return "json must be a JSON schema: an object" + (", JSON text or a .json file" if allow_file else " or JSON text")
    if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
        return "choice must be a non-empty list of strings"
    if kind in ("regex", "grammar") and not (isinstance(value, str) and value.strip() and "\x00" not in value):
        return f"{kind} must be a non-empty string"
    if kind == "json_object" and value is not True:
        return "json_object must be true"
    return None
