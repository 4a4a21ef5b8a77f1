"""The run's configuration schema: typed dataclasses whose names and defaults are the seeds' (seed 000's
text_prompt node and engine options), registered with Hydra's ConfigStore. Loading it: spmd_dp/config/load.py;
checking it: spmd_dp/config/checks.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # spmd_dp/
ASSETS_DIR = PACKAGE_DIR / "assets"
SAMPLE_INPUT = ASSETS_DIR / "sample.jsonl"  # the bundled sample dataset (96 prompts): the default input

ENGINES = ("vllm_dp", "echo")
SCHEDULES = ("dynamic", "static")
DEVICES = ("auto", "cuda", "cpu")
OUTPUT_FORMATS = ("jsonl", "parquet")
OUTPUT_MODES = ("single", "sharded")  # one file written by rank 0 | a folder of shards written by every rank
ON_BAD_RECORD = ("fail", "skip")
ECHO_FAULTS = ("die", "hang")
# the keys a run's status shows beside its figures (spmd_dp/status/live.py: ${name}.status.json)
SUMMARY_KEYS = ("model_name", "inference_engine", "data_dir", "input_data_path", "output_dir", "schedule", "batch_size",
                "output_mode", "output_format", "task", "metrics_port")
DEFAULT_MODEL = "spmd-dp/tiny-llama"
TASKS = ("generate", "embed", "classify", "score", "reward")  # generate: vLLM's generate runner; the rest: pooling
INPUT_FORMATS = ("auto", "jsonl", "parquet", "hf_dataset", "openai_batch")  # auto: by extension (inputs/formats.py)
ON_LONG_PROMPT = ("fail", "skip", "truncate_left", "truncate_right")
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")  # vLLM's StructuredOutputsParams
STRUCTURED_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
POOLING_OPTIONS = ("dimensions", "use_activation")  # vLLM's PoolingParams


@dataclass
class VllmOptions:
    """The engine's options (vllm.LLM arguments, the rank's device slice, supervision)."""

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
    limit_mm_per_prompt: Optional[int] = None  # images a prompt may hold (vLLM's limit_mm_per_prompt.image); null: the model's
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
    # LoRA adapters (vLLM's LoRARequest): name -> folder (PEFT format), hub id, or an embedded adapter
    # (spmd-dp/tiny-llama-lora-a); a record picks one by name (lora_adapter)
    lora_adapters: Dict[str, str] = field(default_factory=dict)
    max_lora_rank: Optional[int] = None  # null: the largest `r` of the adapters' adapter_config.json (else 16)


@dataclass
class EngineOptions(VllmOptions):
    """`engine_options`: the engine's options, then the echo engine's switches (inference_engine=echo: a dry run
    with no model, for tests, benchmarks and rehearsing faults). Both under engine_options (DESIGN.md's keys)."""

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
class PreflightOptions:
    """`preflight=true` (short for preflight.enabled=true): the run's own command checks the input, counts its prompt
    tokens and times each rank's engine on a sample, writes only ${name}.preflight.json (spmd_dp/preflight/)."""

    enabled: bool = False
    sample_records: Optional[int] = None  # records each rank's engine runs to measure its speed; null: two engine-fulls
    token_sample: int = 1_000_000  # prompts tokenized for the length distribution (all ranks); more: a uniform sample
    gpu_hour_price: Optional[float] = None  # price of a GPU-hour (a rank's device-hour on CPU): the projection's cost


@dataclass
class RunConfig:
    # seed 000, workflow level
    name: str = "generate_responses"
    data_dir: Optional[str] = None  # null: the working directory
    output_dir: str = "outputs"
    prompts_dir: Optional[str] = None
    # seed 000, load node. input_data_path: a file, a folder, a glob, a URL (s3://, gs://, hf://, file://), or a
    # list of them; relative to data_dir if given, else to the working directory (spmd_dp/inputs/sources.py)
    input_data_path: Any = str(SAMPLE_INPUT)
    primary_key: str = "id"
    # auto (by extension) | jsonl | parquet | hf_dataset (datasets' save_to_disk) | openai_batch (OpenAI Batch
    # API request lines, JSONL: spmd_dp/prompting/openai_batch.py)
    input_format: str = "auto"
    storage_options: Dict[str, Any] = field(default_factory=dict)  # fsspec options for URLs (endpoint_url, anon, ...)
    # the prompt of a record (spmd_dp/prompting/prompts.py): a `messages_field` list is a chat; else a template
    # (prompt_template, or ${prompts_dir}/${name}.jinja|.txt) rendered with the record; else prompt_field
    prompt_field: str = "prompt"
    prompt_template: Optional[str] = None
    messages_field: str = "messages"
    chat: bool = False  # send text prompts as one user turn through the model's chat template
    system_prompt: Optional[str] = None  # chat: the system turn before it
    # a record field holding the prompt's images: a path (relative to data_dir), a URL, a data: URL, image bytes (a
    # Parquet binary column, a Hugging Face Image feature), or a list of them (spmd_dp/prompting/images.py)
    image_field: Optional[str] = None
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
    # records that share a prompt prefix go to one rank, close in time (vLLM's prefix cache serves them):
    # auto (default) groups them when that shares at least a tenth more of the prompts between neighbours than
    # the input order does; true: whenever they share; false: today's order (docs/prefix-affinity.md)
    prefix_affinity: Any = "auto"
    prefix_field: Optional[str] = None  # group records by this field's value instead of their prompts' prefixes
    overwrite: bool = False
    output_format: str = "jsonl"  # jsonl | parquet (${output_dir}/${name}.parquet, via pyarrow)
    # single: rank 0 receives every row and writes ${name}.jsonl; sharded: each rank writes the batches it finished
    # (spmd_dp/output/shards.py), rank 0 journals their metadata, the output is the folder ${name}/ of shards in input order
    output_mode: str = "single"
    merge: bool = False  # output_mode=sharded: write one file (${name}.jsonl|.parquet) from the shards at the end
    return_metadata: bool = False  # add ${name}_metadata: finish_reason, token counts, rank, batch
    on_bad_record: str = "fail"  # skip: bad records go to ${output_dir}/${name}.errors.jsonl, the rest run
    log_level: str = "INFO"
    # per-record requests (spmd_dp/prompting/options.py): each of these may be set per record by a field of the same name
    task: Any = "generate"  # generate | embed | classify | score | reward, or a list of them (one engine each)
    return_token_ids: bool = False  # add ${name}_token_ids (also written whenever logprobs are asked for)
    lora_adapter: Optional[str] = None  # the adapter (a name in engine_options.lora_adapters); null: the base model
    pooling_options: Dict[str, Any] = field(default_factory=dict)  # PoolingParams: dimensions, use_activation
    document_field: str = "document"  # task=score: the record's second text (the first is its prompt)
    max_retries: int = 0  # requests the engine failed (not bad input) are tried again up to this many times
    on_long_prompt: str = "fail"  # a prompt longer than the context: fail | skip | truncate_left | truncate_right
    clamp_max_tokens: bool = False  # lower max_tokens to what the context leaves after the prompt
    # what a run tells about itself (spmd_dp/status/, spmd_dp/preflight/)
    preflight: PreflightOptions = field(default_factory=PreflightOptions)
    metrics_port: Optional[int] = None  # rank 0 serves the live status as Prometheus metrics on this port (0: any free)


ConfigStore.instance().store(name="spmd_dp_schema", node=RunConfig)


def task_list(task: Any) -> List[str]:
    """`task` as a list: one engine per task on the rank (the first is the records' default)."""
    if isinstance(task, str):
        return [task]
    return [str(t) for t in task] if isinstance(task, (list, tuple)) or OmegaConf.is_list(task) else []
