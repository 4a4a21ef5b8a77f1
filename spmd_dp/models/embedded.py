"""Embedded default models: tiny Llama-architecture causal LMs built locally.

Each entry of ``EMBEDDED_MODELS`` describes a small ``LlamaForCausalLM`` with
random weights drawn from a fixed seed, plus a byte-level BPE tokenizer trained
on the bundled ``assets/tokenizer_corpus.txt``.  No download is needed: on
first use :func:`resolve_model` writes a normal Hugging Face model folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``generation_config.json``) into a cache directory,
and vLLM loads it with ``LLM(model=<folder>)``.

The files are byte-identical across runs and machines: weights are drawn with
``torch.Generator().manual_seed(spec.seed)`` in float64 (torch's float32 normal
sampler gives different bits on AVX2/AVX512/plain CPUs) and then cast to
float32, and BPE training in ``tokenizers`` is deterministic (checked by the
tests).  Folders are created atomically (build in a temp dir, then rename), so
many processes, e.g. torchrun ranks on one node, may resolve the same model at
once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger("spmd_dp")

BUILDER_VERSION = 1
"""Bump whenever the files written for an unchanged spec would change."""

CORPUS_PATH = Path(__file__).resolve().parents[1] / "assets" / "tokenizer_corpus.txt"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, START_HEADER, END_HEADER, EOT_TOKEN)
"""Special tokens, in id order: they get ids 0..5."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """Shape and seed of one embedded Llama model."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_size: int = 1024
    max_position: int = 2048
    seed: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    num_labels: int = 0
    """0: a causal LM (``LlamaForCausalLM``); N >= 1: a sequence classifier
    (``LlamaForSequenceClassification``, a ``score`` head of N labels), which vLLM
    runs with its pooling runner (classify, score, reward)."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def version(self) -> str:
        """Short hash of the spec, the builder version and the corpus bytes."""
        spec = dataclasses.asdict(self)
        if not self.num_labels:  # the causal LMs keep the hash (and cache folder) they had
            del spec["num_labels"]
        payload = json.dumps(
            {"spec": spec, "builder": BUILDER_VERSION}, sort_keys=True
        ).encode() + CORPUS_PATH.read_bytes()
        return hashlib.sha256(payload).hexdigest()[:12]


EMBEDDED_MODELS: dict[str, ModelSpec] = {
    # head_dim must be >= 64 for vLLM's CPU attention backend.
    "spmd-dp/tiny-llama": ModelSpec(layers=2, hidden=128, heads=2, kv_heads=2, intermediate=256),
    "spmd-dp/small-llama": ModelSpec(
        layers=4, hidden=512, heads=8, kv_heads=8, intermediate=1408, seed=1
    ),
    # the tiny Llama's body with a classification head: task=classify (3 labels) and
    # task=score / task=reward (1 label: a cross-encoder / reward model)
    "spmd-dp/tiny-llama-classifier": ModelSpec(
        layers=2, hidden=128, heads=2, kv_heads=2, intermediate=256, num_labels=3
    ),
    "spmd-dp/tiny-llama-reward": ModelSpec(
        layers=2, hidden=128, heads=2, kv_heads=2, intermediate=256, num_labels=1
    ),
}


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter (PEFT format) for an embedded model, random weights from a fixed seed."""

    base: str  # an EMBEDDED_MODELS name
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    std: float = 0.05
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def version(self) -> str:
        payload = json.dumps({"adapter": dataclasses.asdict(self), "base": EMBEDDED_MODELS[self.base].version(),
                              "builder": BUILDER_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


EMBEDDED_ADAPTERS: dict[str, AdapterSpec] = {
    # two adapters for the tiny Llama: `+engine_options.lora_adapters.a=spmd-dp/tiny-llama-lora-a`
    "spmd-dp/tiny-llama-lora-a": AdapterSpec(base="spmd-dp/tiny-llama", seed=101),
    "spmd-dp/tiny-llama-lora-b": AdapterSpec(base="spmd-dp/tiny-llama", seed=202),
}


def is_embedded(model_name: str) -> bool:
    """True if ``model_name`` names one of the embedded models."""
    return model_name in EMBEDDED_MODELS


def is_embedded_adapter(name: str) -> bool:
    """True if ``name`` names one of the embedded LoRA adapters."""
    return name in EMBEDDED_ADAPTERS


def default_cache_dir() -> Path:
    """``$SPMD_DP_CACHE`` if set, else ``~/.cache/spmd_dp``."""
    env = os.environ.get("SPMD_DP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spmd_dp"


def resolve_model(model_name: str, cache_dir: str | None = None) -> str:
    """Return a path vLLM can load for ``model_name``.

    An embedded name (model or LoRA adapter) gives its materialised folder, built
    on first use; any other name (a hub id or a local path) is returned unchanged.
    """
    if is_embedded_adapter(model_name):
        spec: Any = EMBEDDED_ADAPTERS[model_name]
        write = lambda out: write_lora_adapter(spec, out)  # noqa: E731
    elif is_embedded(model_name):
        spec = EMBEDDED_MODELS[model_name]
        write = lambda out: write_model_folder(spec, out)  # noqa: E731
    else:
        return model_name
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = root / f"{model_name.replace('/', '--')}-{spec.version()}"
    if final.is_dir():
        return str(final)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        logger.info("building embedded model %s in %s", model_name, final)
        write(tmp)
        os.rename(tmp, final)
    except OSError:
        # Another process renamed its copy into place first: use that one.
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
        logger.debug("lost the race to build %s; using the existing folder", final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def head_config(spec: ModelSpec) -> dict[str, Any]:
    """The part of the model's config.json that says what it can serve: its architecture and labels (read by
    spmd_dp/models/check.py without building the model)."""
    head: dict[str, Any] = {}
    if spec.num_labels:
        head = {"num_labels": spec.num_labels,
                "id2label": {str(i): f"LABEL_{i}" for i in range(spec.num_labels)},
                "label2id": {f"LABEL_{i}": i for i in range(spec.num_labels)}}
    return {**head, "architectures": ["LlamaForSequenceClassification" if spec.num_labels else "LlamaForCausalLM"]}


def write_model_folder(spec: ModelSpec, out_dir: Path) -> None:
    """Write all files of the model described by ``spec`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(spec.vocab_size)
    if tokenizer.get_vocab_size() != spec.vocab_size:
        raise RuntimeError(
            f"BPE reached {tokenizer.get_vocab_size()} tokens, spec wants {spec.vocab_size}"
        )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    bos, eos, pad, eot = ids[BOS_TOKEN], ids[EOS_TOKEN], ids[PAD_TOKEN], ids[EOT_TOKEN]

    _write_json(out_dir / "config.json", {
        **head_config(spec),
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    })
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": bos,
        "eos_token_id": [eos, eot],
        "pad_token_id": pad,
    })
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": spec.max_position,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_weights(spec, out_dir / "model.safetensors")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 / Llama 3 style) trained on the bundled corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = CORPUS_PATH.read_text(encoding="utf-8").replace("\r\n", "\n")
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos_id)],
        ),
    ])
    return tokenizer


def _write_weights(spec: ModelSpec, path: Path) -> None:
    """Random Llama weights, normal(0, 0.02) in a fixed order; norm weights are ones.

    Drawn in float64, whose CPU sampler is the same on every instruction set
    (torch's float32 one is not), then cast to float32.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(spec.seed)

    def normal(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.float64).normal_(0.0, 0.02, generator=gen)
        return t.to(torch.float32)

    h, hd, inter = spec.hidden, spec.head_dim, spec.intermediate
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(spec.vocab_size, h)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(spec.heads * hd, h)
        tensors[p + "self_attn.k_proj.weight"] = normal(spec.kv_heads * hd, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(spec.kv_heads * hd, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, spec.heads * hd)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, h)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, h)
        tensors[p + "mlp.down_proj.weight"] = normal(h, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(h)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h)
    tensors["model.norm.weight"] = torch.ones(h)
    if spec.num_labels:
        tensors["score.weight"] = normal(spec.num_labels, h)
    else:
        tensors["lm_head.weight"] = normal(spec.vocab_size, h)
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_lora_adapter(spec: AdapterSpec, out_dir: Path) -> None:
    """A PEFT LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
    for ``spec.base``: lora_A and lora_B drawn from ``spec.seed`` (B is not zero, as a
    freshly initialised PEFT adapter's would be, so the adapter changes the outputs)."""
    import torch
    from safetensors.torch import save_file

    base = EMBEDDED_MODELS[spec.base]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)

    def normal(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.float64).normal_(0.0, spec.std, generator=gen)
        return t.to(torch.float32)

    h, hd, inter = base.hidden, base.head_dim, base.intermediate
    shapes = {  # (in, out) of each target projection
        "q_proj": (h, base.heads * hd), "k_proj": (h, base.kv_heads * hd), "v_proj": (h, base.kv_heads * hd),
        "o_proj": (base.heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }
    tensors: dict[str, torch.Tensor] = {}
    for i in range(base.layers):
        for target in spec.targets:
            block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            p = f"base_model.model.model.layers.{i}.{block}.{target}"
            fan_in, fan_out = shapes[target]
            tensors[p + ".lora_A.weight"] = normal(spec.rank, fan_in)
            tensors[p + ".lora_B.weight"] = normal(fan_out, spec.rank)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": list(spec.targets),
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    })
