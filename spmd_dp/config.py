"""The run's configuration: typed dataclasses (the schema), Hydra composition, validation.

Key names and defaults are those of the seed documents (seed 000's text_prompt
node and engine options). `load_config(overrides)` composes `conf/<name>.yaml`
over the schema with Hydra's compose API, applies the overrides, and returns a
validated `RunConfig`; every mistake becomes a one-line `UsageError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from spmd_dp.errors import UsageError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"

ENGINES = ("vllm_dp", "echo")
SCHEDULES = ("dynamic", "static")
DEVICES = ("auto", "cuda", "cpu")
OUTPUT_FORMATS = ("jsonl", "parquet")
OUTPUT_MODES = ("single", "sharded")  # one file written by rank 0 | a folder of shards written by every rank
ON_BAD_RECORD = ("fail", "skip")
ECHO_FAULTS = ("die", "hang")
DEFAULT_MODEL = "spmd-dp/tiny-llama"
TASKS = ("generate", "embed", "classify", "score", "reward")  # generate: vLLM's generate runner; the rest: pooling
INPUT_FORMATS = ("auto", "jsonl", "parquet", "hf_dataset", "openai_batch")  # auto: by extension (inputs/formats.py)
ON_LONG_PROMPT = ("fail", "skip", "truncate_left", "truncate_right")
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")  # vLLM's StructuredOutputsParams
STRUCTURED_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
POOLING_OPTIONS = ("dimensions", "use_activation")  # vLLM's PoolingParams


@dataclass
class EngineOptions:
    # seed 000, "Engine Options"
    data_parallel_size: Optional[int] = None  # null: WORLD_SIZE; when set it must equal WORLD_SIZE
    gpus_per_dp_rank: int = 1  # = vLLM tensor_parallel_size inside a rank
    dp_master_ip: str = "127.0.0.1"
    dp_master_port: Optional[int] = None  # null: chosen for you
    enable_data_parallel: bool = True
    disable_progress_bars: bool = True
    # seed 000, "Additional vLLM parameters"
    trust_remote_code: bool = False
    gpu_memory_utilization: float = 0.9
    max_model_len: Optional[int] = None
    dtype: str = "auto"
    # more engine arguments
    max_num_seqs: Optional[int] = None  # null: vLLM's default
    vllm_kwargs: Dict[str, Any] = field(default_factory=dict)  # any other vllm.LLM(...) argument
    # the device slice of a rank
    device: str = "auto"  # auto | cuda | cpu
    cpu_cores_per_dp_rank: Optional[int] = None  # CPU only; null: the node's cores / ranks per node
    cpu_kvcache_space_gib: Optional[int] = None  # CPU only; null: $VLLM_CPU_KVCACHE_SPACE or 1
    # seed 003's KV cache synchronisation: ranks agree (MIN) on the memory for the KV cache before
    # the engines start, so every rank runs the same cache size
    agree_kv_cache: bool = False
    # a rank supervises its engine: one that dies (or stalls, batch_timeout) is restarted on the same
    # slice at most this many times; then the rank hands its work back to the others and takes no more
    max_engine_restarts: int = 2
    # the echo engine (inference_engine=echo): a dry run with no model
    echo_delay_s: float = 0.0  # seconds slept per word returned
    echo_fail_ranks: List[int] = field(default_factory=list)  # fault injection: engine start fails here
    echo_fail_keys: List[str] = field(default_factory=list)  # fault injection: these records' requests fail ...
    echo_fail_times: int = 1  # ... this many times each (then succeed): rehearses max_retries
    # fault injection mid-run: on these ranks the engine dies (or hangs: echo_fault=hang) after
    # echo_fault_after_steps steps; so do its next echo_fault_times - 1 restarts (then one runs clean)
    echo_fault_ranks: List[int] = field(default_factory=list)
    echo_fault: str = "die"  # die | hang
    echo_fault_after_steps: int = 10
    echo_fault_times: int = 1
    # LoRA adapters (vLLM's LoRARequest): name -> folder (PEFT format), hub id, or an embedded adapter
    # (spmd-dp/tiny-llama-lora-a); a record picks one by name (lora_adapter)
    lora_adapters: Dict[str, str] = field(default_factory=dict)
    max_lora_rank: Optional[int] = None  # null: the largest `r` of the adapters' adapter_config.json (else 16)
    echo_start_s: float = 0.0  # seconds the echo engine takes to start (rehearses a slow engine start)
    echo_start_ranks: List[int] = field(default_factory=list)  # the ranks whose echo engine takes echo_start_s ([]: all)


@dataclass
class GenerationOptions:
    """vLLM SamplingParams. Fields left null are not passed (vLLM's default applies)."""

    temperature: Optional[float] = 0.7
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    max_tokens: int = 512
    min_tokens: Optional[int] = None
    n: int = 1
    # Per-record seed = hash(seed, primary key): the same record gets the same text
    # whatever the layout, schedule or restart. null: unseeded sampling.
    seed: Optional[int] = 0
    stop: Optional[List[str]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: Optional[bool] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    skip_special_tokens: Optional[bool] = None
    logprobs: Optional[int] = None  # k: the k most likely tokens (and the sampled one's) per generated token
    prompt_logprobs: Optional[int] = None  # k: the same for every prompt token
    # vLLM's StructuredOutputsParams: one of json (a JSON schema: object, JSON text or a .json file), regex,
    # choice (list of strings), grammar (EBNF/Lark), json_object (true); plus disable_any_whitespace, ...
    structured_outputs: Dict[str, Any] = field(default_factory=dict)  # {}: none
    extra: Dict[str, Any] = field(default_factory=dict)  # any other SamplingParams field


@dataclass
class RunConfig:
    # seed 000, workflow level
    name: str = "generate_responses"
    data_dir: str = str(ASSETS_DIR)
    output_dir: str = "outputs"
    prompts_dir: Optional[str] = None
    # seed 000, load node. input_data_path: a file, a folder, a glob, a URL (s3://, gs://, hf://, file://), or a
    # list of them, relative to data_dir unless absolute (spmd_dp/inputs/sources.py)
    input_data_path: Any = "sample.jsonl"
    primary_key: str = "id"
    # auto (by extension) | jsonl | parquet | hf_dataset (datasets' save_to_disk) | openai_batch (OpenAI Batch
    # API request lines, JSONL: spmd_dp/openai_batch.py)
    input_format: str = "auto"
    storage_options: Dict[str, Any] = field(default_factory=dict)  # fsspec options for URLs (endpoint_url, anon, ...)
    # the prompt of a record (spmd_dp/prompts.py): a `messages_field` list is a chat; else a template
    # (prompt_template, or ${prompts_dir}/${name}.jinja|.txt) rendered with the record; else prompt_field
    prompt_field: str = "prompt"
    prompt_template: Optional[str] = None
    messages_field: str = "messages"
    chat: bool = False  # send text prompts as one user turn through the model's chat template
    system_prompt: Optional[str] = None  # chat: the system turn before it
    # seed 000, text_prompt node
    model_name: str = DEFAULT_MODEL
    inference_engine: str = "vllm_dp"
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    batch_size: int = 32
    batch_timeout: float = 600.0
    # SIGTERM / SIGUSR1 (Slurm's notice) / a first Ctrl-C: no new claims, in-flight requests get this long
    # to finish and be committed, then the run exits (a rerun resumes). Below torchrun's and Slurm's
    # 30 s between their SIGTERM and SIGKILL.
    drain_timeout: float = 20.0
    generation_options: GenerationOptions = field(default_factory=GenerationOptions)
    # seed 003's "different sampling per worker": rank -> generation_options fields, e.g.
    # +generation_options_per_rank.1.max_tokens=16 (with schedule=dynamic, which rank gets a record varies)
    generation_options_per_rank: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # spmd_dp
    workflow: Optional[str] = None  # a seed-000 workflow JSON: run its text_prompt nodes (spmd_dp/workflow.py)
    schedule: str = "dynamic"
    overwrite: bool = False
    output_format: str = "jsonl"  # jsonl | parquet (${output_dir}/${name}.parquet, via pyarrow)
    # single: rank 0 receives every row and writes ${name}.jsonl; sharded: each rank writes the batches it finished
    # (spmd_dp/shards.py), rank 0 journals their metadata, the output is the folder ${name}/ of shards in input order
    output_mode: str = "single"
    merge: bool = False  # output_mode=sharded: write one file (${name}.jsonl|.parquet) from the shards at the end
    return_metadata: bool = False  # add ${name}_metadata: finish_reason, token counts, rank, batch
    on_bad_record: str = "fail"  # skip: bad records go to ${output_dir}/${name}.errors.jsonl, the rest run
    log_level: str = "INFO"
    # per-record requests (spmd_dp/requests.py): each of these may be set per record by a field of the same name
    task: Any = "generate"  # generate | embed | classify | score | reward, or a list of them (one engine each)
    return_token_ids: bool = False  # add ${name}_token_ids (also written whenever logprobs are asked for)
    lora_adapter: Optional[str] = None  # the adapter (a name in engine_options.lora_adapters); null: the base model
    pooling_options: Dict[str, Any] = field(default_factory=dict)  # PoolingParams: dimensions, use_activation
    document_field: str = "document"  # task=score: the record's second text (the first is its prompt)
    max_retries: int = 0  # requests the engine failed (not bad input) are tried again up to this many times
    on_long_prompt: str = "fail"  # a prompt longer than the context: fail | skip | truncate_left | truncate_right
    clamp_max_tokens: bool = False  # lower max_tokens to what the context leaves after the prompt

    @property
    def input_path(self) -> Path:
        """The input as a local path (the first entry of a list; `~` expanded)."""
        entry = self.input_data_path[0] if isinstance(self.input_data_path, list) else self.input_data_path
        return Path(self.data_dir).expanduser() / Path(str(entry)).expanduser()


ConfigStore.instance().store(name="spmd_dp_schema", node=RunConfig)


def find_config_dir() -> Path:
    """`conf/` beside the package (source checkout) or inside it (wheel install)."""
    for candidate in (PACKAGE_DIR.parent / "conf", PACKAGE_DIR / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UsageError(f"config error: no config.yaml in {PACKAGE_DIR.parent / 'conf'}; reinstall spmd_dp")


def _quote_home(override: str) -> str:
    """key=~/x -> key='~/x': Hydra's override grammar takes no unquoted '~' in a value (spmd_dp expands it)."""
    key, eq, value = override.partition("=")
    if eq and value.startswith("~") and not key.startswith("~"):
        return f"{key}='{value}'"
    return override


def compose_config(overrides: List[str], config_name: str = "config", config_dir: str | None = None) -> DictConfig:
    """Hydra composition of `<config_dir>/<config_name>.yaml` + overrides (not validated)."""
    overrides = [_quote_home(o) for o in overrides]
    cdir = Path(config_dir).resolve() if config_dir else find_config_dir()
    if not (cdir / f"{config_name}.yaml").is_file():
        raise UsageError(f"config error: no config file {cdir / (config_name + '.yaml')}; pass --config-dir/--config-name")
    try:
        with initialize_config_dir(version_base=None, config_dir=str(cdir), job_name="spmd_dp"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError(_one_line(e)) from None


def load_config(overrides: List[str], config_name: str = "config", config_dir: str | None = None) -> RunConfig:
    cfg = compose_config(overrides, config_name, config_dir)
    _reject_unknown(cfg, OmegaConf.structured(RunConfig))
    try:
        run_cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise UsageError(_one_line(e)) from None
    assert isinstance(run_cfg, RunConfig), type(run_cfg)
    validate(run_cfg)
    return run_cfg


def _one_line(e: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep the key, the value and the reason."""
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OmegaConfBaseException) and not isinstance(e, OmegaConfBaseException):
        e = cause
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    key = getattr(e, "full_key", None)
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and key:
        return _unknown_key(key)
    options = getattr(e, "options", None)
    if options:  # a preset that does not exist
        what = first.split(": ", 1)[-1]
        return f"config error: {what}; available: {', '.join(options)}"
    if "Error parsing override" in text:
        return f"config error: {first}; write overrides as key=value, e.g. batch_size=64"
    override = getattr(e, "override", None)
    if override and "=" in override:  # a value with characters Hydra's grammar reserves ([ ] { } ...)
        key, _, value = override.partition("=")
        return (f"config error: cannot parse the override {override} ({first}); quote the value: "
                f"'{key}=\"{value}\"'")
    where = f"{key}: " if key else ""
    return f"config error: {where}{first}"


def _unknown_key(key: str) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node: Any = OmegaConf.structured(RunConfig)
    for part in filter(None, parent.split(".")):
        node = node[part] if isinstance(node, DictConfig) and part in node else None
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict:
        return f"config error: {key} is a new key in the mapping {parent}: add it with a plus, +{key}=..."
    valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else "(none)"
    return f"config error: unknown key '{key}'; valid keys{' under ' + parent if parent else ''}: {valid}"


def _reject_unknown(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """`+key=value` appends even to a structured config; only dict-typed fields may grow."""
    for k in cfg.keys():
        full = f"{prefix}{k}"
        if k not in schema:
            raise UsageError(_unknown_key(full))
        sub, sub_schema = cfg[k], schema[k]
        if isinstance(sub, DictConfig) and isinstance(sub_schema, DictConfig) and OmegaConf.get_type(sub_schema) is not dict:
            _reject_unknown(sub, sub_schema, full + ".")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UsageError(f"config error: {key}={value!r} is not allowed; {allowed}")


def validate(cfg: RunConfig) -> None:
    """Checks that need no environment (WORLD_SIZE and GPUs are checked by the plan)."""
    eo, go = cfg.engine_options, cfg.generation_options
    _check(bool(cfg.name) and "/" not in cfg.name, "name", cfg.name, "use a non-empty file name (no '/')")
    _check(cfg.inference_engine in ENGINES, "inference_engine", cfg.inference_engine, f"use one of {', '.join(ENGINES)}")
    _check(cfg.schedule in SCHEDULES, "schedule", cfg.schedule, f"use one of {', '.join(SCHEDULES)}")
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
        go.structured_outputs = _read_schema_file(go.structured_outputs)
    tasks = task_list(cfg.task)
    _check(bool(tasks) and all(t in TASKS for t in tasks) and len(set(tasks)) == len(tasks), "task", cfg.task,
           f"use one of {', '.join(TASKS)}, or a list of them, e.g. task=[generate,embed]")
    _check(cfg.input_format in INPUT_FORMATS, "input_format", cfg.input_format, f"use one of {', '.join(INPUT_FORMATS)}")
    if cfg.input_format == "openai_batch":
        _check(cfg.primary_key in ("id", "custom_id"), "primary_key", cfg.primary_key,
               "OpenAI batch files are keyed by custom_id: leave primary_key unset")
        cfg.primary_key = "custom_id"
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
    fields = [f for f in GenerationOptions.__dataclass_fields__ if f != "extra"]
    overlap = set(go.extra) & set(fields)
    _check(not overlap, "generation_options.extra", sorted(overlap), "set these fields directly under generation_options")
    for rank, opts in cfg.generation_options_per_rank.items():
        _check(rank.isdigit(), "generation_options_per_rank", rank, "key it by rank number, e.g. +generation_options_per_rank.1.max_tokens=16")
        unknown = sorted(set(opts) - set(fields) - set(go.extra))
        _check(not unknown, f"generation_options_per_rank.{rank}", unknown, f"use generation_options fields: {', '.join(fields)}")


LORA_PROMPT_LOGPROBS = ("vLLM 0.32 cannot give prompt_logprobs with LoRA adapters enabled (its LoRA logits layer "
                        "fails: measured on CPU); run such records without engine_options.lora_adapters")


def _read_schema_file(spec: Dict[str, Any]) -> Dict[str, Any]:
    """structured_outputs.json given as a path to a .json file: the schema it holds."""
    value = spec.get("json")
    if not (isinstance(value, str) and value.strip().endswith(".json") and not value.lstrip().startswith("{")):
        return spec
    path = Path(value).expanduser()
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"config error: generation_options.structured_outputs.json={value!r}: {e.strerror}; give "
                         f"a JSON schema file that exists, or the schema itself") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"config error: generation_options.structured_outputs.json={value!r} is not JSON ({e.msg} "
                         f"at line {e.lineno}); fix the schema file") from None
    return {**spec, "json": schema}


def task_list(task: Any) -> List[str]:
    """`task` as a list: one engine per task on the rank (the first is the records' default)."""
    if isinstance(task, str):
        return [task]
    return [str(t) for t in task] if isinstance(task, (list, tuple)) or OmegaConf.is_list(task) else []


def structured_outputs_problem(spec: Any, allow_file: bool = False) -> Optional[str]:
    """Why `spec` is not a StructuredOutputsParams object (shape only; compiling it: spmd_dp/structured.py)."""
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


def sampling_kwargs(cfg: "RunConfig", rank: int) -> Dict[str, Any]:
    """A rank's SamplingParams keyword arguments (null fields left out, `seed` is per record)."""
    go = cfg.generation_options
    out = {k: v for k, v in vars(go).items() if k != "extra" and v is not None and v != {}}
    out.update(go.extra)
    out.update(cfg.generation_options_per_rank.get(str(rank), {}))
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = ["RunConfig", "EngineOptions", "GenerationOptions", "load_config", "compose_config", "validate",
           "sampling_kwargs", "task_list", "structured_outputs_problem", "to_yaml"]
