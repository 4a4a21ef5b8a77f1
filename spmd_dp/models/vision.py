"""Weight-less vision-language model folders, for vLLM's `load_format=dummy`: the GPU benchmark's Qwen2-VL
(`qwen2vl-2b`, `qwen2vl-7b`: Qwen2-VL-2B/7B-Instruct's shapes) and the CPU tests' tiny Idefics3 (`idefics3-tiny`,
SmolVLM's architecture: the one vision family of vLLM 0.32 CPU here whose modules import no torchvision;
Qwen2-VL's and LLaVA's import transformers modules that do).

What a reader would get wrong: the folder has no weights at all, and nothing here is downloaded. It holds what
vLLM needs besides weights, written locally: config.json (text and vision towers), the image processor's config
(run by transformers' PIL backend where torchvision is missing), a byte-level BPE tokenizer padded to the model's
vocabulary with the family's special tokens, and the family's chat template (an image part becomes its image
placeholder: Qwen2-VL's `<|vision_start|><|image_pad|><|vision_end|>`, Idefics3's `<image>`).

    python -m spmd_dp.models.vision --shape qwen2vl-7b --out /tmp/dummy-qwen2vl-7b
    LLM(model="/tmp/dummy-qwen2vl-7b", load_format="dummy", ...)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from spmd_dp.models.embedded import CORPUS_PATH

# Qwen2-VL's special tokens, in id order from its <|endoftext|> (151643 in the real vocabulary)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

CHAT_TEMPLATE = (  # Qwen2-VL-Instruct's
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_depth: int
    vision_dim: int
    vision_heads: int
    max_position: int = 32768
    tie: bool = False
    dtype: str = "bfloat16"
    # the image processor's pixel cap: 1280 visual tokens, the value Qwen2-VL's model card suggests (its default,
    # 12845056, lets vLLM profile memory for a 16384-token image); the benchmark's images stay below it
    max_pixels: int = 1280 * 28 * 28

    @property
    def mrope_section(self):
        half = self.hidden // self.heads // 2  # rotary pairs per head, split over (time, height, width)
        return [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]


SHAPES: Dict[str, Shape] = {
    "qwen2vl-2b": Shape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                        vision_depth=32, vision_dim=1280, vision_heads=16, tie=True),
    "qwen2vl-7b": Shape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
                        vision_depth=32, vision_dim=1280, vision_heads=16),
    # vLLM CPU: head dims of 64 (its attention backend's least), 2 + 2 layers; 56x56 tiles of 4 image tokens
    "idefics3-tiny": Shape(hidden=128, layers=2, heads=2, kv_heads=2, intermediate=256, vocab=1024, vision_depth=2,
                           vision_dim=128, vision_heads=2, max_position=4096, dtype="float32"),
}
TILE = 56  # idefics3-tiny: its images are resized to a longest edge of 2 tiles, cut into tiles, plus a global one

IDEFICS3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                     "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
IDEFICS3_TEMPLATE = (  # SmolVLM's
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tokenizer(vocab: int, specials=SPECIALS, bpe_vocab: int = 8000):
    """A byte-level BPE on the bundled corpus, padded with filler tokens so that every id below the specials
    decodes (random weights may sample any id), then the family's specials, then reserved ones up to `vocab`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    n_regular = 151643 if vocab > 151643 + len(specials) else vocab - len(specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(bpe_vocab, n_regular), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").split("\n\n"), trainer=trainer)
    fillers = n_regular - tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<|filler_{i}|>", special=False, normalized=False) for i in range(fillers)])
    reserved = [f"<|reserved_{i}|>" for i in range(vocab - n_regular - len(specials))]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (*specials, *reserved)])
    assert tok.get_vocab_size() == vocab, (tok.get_vocab_size(), vocab)
    return tok


def write_folder(name: str, out: Path) -> Dict[str, Any]:
    """Write the model folder of shape `name` (no weights); returns its config."""
    return (write_idefics3 if name.startswith("idefics3") else write_qwen2_vl)(SHAPES[name], Path(out))


def write_idefics3(shape: Shape, out: Path) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(shape.vocab, IDEFICS3_SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in IDEFICS3_SPECIALS}
    bos, eos, pad = ids["<|im_start|>"], ids["<end_of_utterance>"], ids["<|endoftext|>"]
    text = {"model_type": "llama", "vocab_size": shape.vocab, "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "head_dim": shape.hidden // shape.heads, "max_position_embeddings": shape.max_position,
            "rms_norm_eps": 1e-5, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
            "tie_word_embeddings": False, "torch_dtype": shape.dtype}
    config = {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "text_config": text,
              "vision_config": {"model_type": "idefics3_vision", "hidden_size": shape.vision_dim,
                                "intermediate_size": 2 * shape.vision_dim, "num_hidden_layers": shape.vision_depth,
                                "num_attention_heads": shape.vision_heads, "image_size": TILE, "patch_size": 14},
              "image_token_id": ids["<image>"], "scale_factor": 2, "vocab_size": shape.vocab, "pad_token_id": pad,
              "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": False, "torch_dtype": shape.dtype}
    _json(out / "config.json", config)
    _json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})
    _json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
        "pad_token": "<|endoftext|>", "model_max_length": shape.max_position, "chat_template": IDEFICS3_TEMPLATE})
    _json(out / "chat_template.json", {"chat_template": IDEFICS3_TEMPLATE})
    _json(out / "preprocessor_config.json", {
        "image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 2 * TILE},
        "max_image_size": {"longest_edge": TILE}, "do_image_splitting": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "resample": 1, "do_convert_rgb": True, "do_pad": True,
        "processor_class": "Idefics3Processor"})
    _json(out / "processor_config.json", {"processor_class": "Idefics3Processor", "image_seq_len": (TILE // 14) ** 2 // 4})
    return config


def write_qwen2_vl(shape: Shape, out: Path) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(shape.vocab)
    tok.save(str(out / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    eos, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    text = {"vocab_size": shape.vocab, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "hidden_act": "silu", "max_position_embeddings": shape.max_position,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": shape.tie, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": shape.layers, "attention_dropout": 0.0,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": shape.mrope_section},
            "bos_token_id": eos, "eos_token_id": im_end, "dtype": shape.dtype, "torch_dtype": shape.dtype}
    config = {**text, "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
              "text_config": {**text, "model_type": "qwen2_vl_text"},
              "vision_config": {"depth": shape.vision_depth, "embed_dim": shape.vision_dim,
                                "hidden_size": shape.hidden, "hidden_act": "quick_gelu", "mlp_ratio": 4,
                                "num_heads": shape.vision_heads, "in_channels": 3, "patch_size": 14,
                                "spatial_merge_size": 2, "temporal_patch_size": 2, "model_type": "qwen2_vl_vision"},
              "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
              "vision_token_id": ids["<|vision_pad|>"]}
    _json(out / "config.json", config)
    _json(out / "generation_config.json", {"bos_token_id": eos, "eos_token_id": [im_end, eos], "pad_token_id": eos})
    _json(out / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2TokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": shape.max_position,
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE})
    _json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    processor = {"min_pixels": 3136, "max_pixels": shape.max_pixels, "patch_size": 14, "temporal_patch_size": 2,
                 "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
                 "processor_class": "Qwen2VLProcessor"}
    _json(out / "preprocessor_config.json", {**processor, "image_processor_type": "Qwen2VLImageProcessor"})
    _json(out / "video_preprocessor_config.json", {**processor, "video_processor_type": "Qwen2VLVideoProcessor"})
    return config


def _json(path: Path, obj: Dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2vl-7b")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    config = write_folder(a.shape, Path(a.out))
    from transformers import AutoConfig, AutoTokenizer  # the folder loads as transformers reads it

    c = AutoConfig.from_pretrained(a.out)
    t = AutoTokenizer.from_pretrained(a.out)
    image = "<image>" if a.shape.startswith("idefics3") else "<|image_pad|>"
    assert len(t) == config["vocab_size"] and t.convert_tokens_to_ids(image) == config["image_token_id"]
    print(f"[ok] {a.shape} -> {a.out}: {type(c).__name__}, vocab {len(t)}, image token {config['image_token_id']}")


if __name__ == "__main__":
    main()
