"""Tests for spmd_dp.models.embedded: deterministic, atomic creation of the embedded models.

No vLLM here: these tests only build and inspect the model folders.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import multiprocessing.synchronize
from pathlib import Path

import pytest


from spmd_dp.models import embedded as m  # noqa: E402

TINY = "spmd-dp/tiny-llama"
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def file_hashes(folder: str | Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(m.resolve_model(TINY, str(tmp_path_factory.mktemp("cache"))))


def test_builds_are_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    again = m.resolve_model(TINY, str(tmp_path))
    assert Path(again) != tiny_dir
    assert set(file_hashes(tiny_dir)) == EXPECTED_FILES
    assert file_hashes(again) == file_hashes(tiny_dir)


def test_second_resolve_reuses_folder(tiny_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}
    assert m.resolve_model(TINY, str(tiny_dir.parent)) == str(tiny_dir)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before


@pytest.mark.parametrize("name", sorted(m.EMBEDDED_MODELS))
def test_spec_shapes(name: str) -> None:
    spec = m.EMBEDDED_MODELS[name]
    assert spec.hidden % spec.heads == 0
    assert spec.head_dim >= 64, "vLLM's CPU attention needs head_dim >= 64"
    assert spec.heads % spec.kv_heads == 0
    assert m.is_embedded(name)


def test_config_and_weights_match_spec(tiny_dir: Path) -> None:
    from safetensors import safe_open

    spec = m.EMBEDDED_MODELS[TINY]
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == spec.layers
    assert cfg["hidden_size"] == spec.hidden
    assert cfg["head_dim"] == spec.head_dim
    assert cfg["vocab_size"] == spec.vocab_size
    assert cfg["tie_word_embeddings"] is False
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (spec.vocab_size, spec.hidden)
        assert f.get_tensor("lm_head.weight").shape == (spec.vocab_size, spec.hidden)
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q.shape == (spec.heads * spec.head_dim, spec.hidden)
        assert abs(q.std().item() - 0.02) < 0.002
        assert bool((f.get_tensor("model.norm.weight") == 1).all())
    per_layer = {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "input_layernorm", "post_attention_layernorm",
    }
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(spec.layers) for n in per_layer
    }
    assert names == expected


def test_version_changes_with_spec() -> None:
    spec = m.EMBEDDED_MODELS[TINY]
    assert spec.version() == m.ModelSpec(**vars(spec)).version()
    changed = m.ModelSpec(**{**vars(spec), "seed": spec.seed + 1})
    assert changed.version() != spec.version()


def test_non_embedded_names_pass_through(tmp_path: Path) -> None:
    for name in ("meta-llama/Llama-3.2-1B", "/some/local/folder", "spmd-dp/unknown"):
        assert not m.is_embedded(name)
        assert m.resolve_model(name, str(tmp_path)) == name
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPMD_DP_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(m, "write_model_folder", lambda spec, out: (out / "x").write_text("x"))
    path = Path(m.resolve_model(TINY))
    assert path.parent == tmp_path / "env-cache"
    assert TINY.replace("/", "--") in path.name and m.EMBEDDED_MODELS[TINY].version() in path.name


def test_lost_race_discards_temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another process renames its folder into place while we are building."""
    final = tmp_path / f"{TINY.replace('/', '--')}-{m.EMBEDDED_MODELS[TINY].version()}"

    def build_and_get_overtaken(spec: m.ModelSpec, out: Path) -> None:
        (out / "mine").write_text("loser")
        final.mkdir()
        (final / "theirs").write_text("winner")

    monkeypatch.setattr(m, "write_model_folder", build_and_get_overtaken)
    assert m.resolve_model(TINY, str(tmp_path)) == str(final)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
    assert [p.name for p in final.iterdir()] == ["theirs"]


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(spec: m.ModelSpec, out: Path) -> None:
        (out / "partial").write_text("half")
        raise RuntimeError("boom")

    monkeypatch.setattr(m, "write_model_folder", broken)
    with pytest.raises(RuntimeError, match="boom"):
        m.resolve_model(TINY, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _resolve_in_child(cache: str, barrier: mp.synchronize.Barrier, results: mp.Queue) -> None:
    barrier.wait()
    results.put(m.resolve_model(TINY, cache))


def test_concurrent_creation(tiny_dir: Path, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_resolve_in_child, args=(str(tmp_path), barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    paths = {results.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(paths) == 1
    (path,) = paths
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]  # no temp dirs left
    assert file_hashes(path) == file_hashes(tiny_dir)


def test_tokenizer_round_trips_ascii(tiny_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == m.EMBEDDED_MODELS[TINY].vocab_size
    texts = [
        "Hello world, this is a test",
        "  Leading spaces,\ttabs\nand new lines!\n",
        "Numbers 0123456789 and symbols ~`!@#$%^&*()_+-=[]{}|;':\",./<>?",
        "".join(chr(c) for c in range(32, 127)),
    ]
    for text in texts:
        enc = tok.encode(text)
        assert enc.ids[0] == tok.token_to_id(m.BOS_TOKEN)
        assert tok.decode(enc.ids) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    # BPE learned whole common words from the corpus.
    assert len(tok.encode(" the batch of data", add_special_tokens=False).ids) == 4
    for special in m.SPECIAL_TOKENS:
        assert tok.encode(special, add_special_tokens=False).ids == [tok.token_to_id(special)]


def test_chat_template_renders(tiny_dir: Path) -> None:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"

    def raise_exception(msg: str) -> None:
        raise TemplateError(msg)

    # Same environment options as transformers' apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(cfg["chat_template"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    out = template.render(messages=messages, bos_token=cfg["bos_token"], add_generation_prompt=True)
    assert out == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    no_prompt = template.render(messages=messages[:2], bos_token="<|begin_of_text|>",
                                add_generation_prompt=False)
    assert no_prompt.endswith("hi<|eot_id|>")
    with pytest.raises(TemplateError, match="Unsupported role"):
        template.render(messages=[{"role": "robot", "content": "x"}], bos_token="")

    # The chat turn terminator is a stop token for generation.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert tok.token_to_id(m.EOT_TOKEN) in gen["eos_token_id"]
    assert tok.encode(out, add_special_tokens=False).ids.count(tok.token_to_id(m.EOT_TOKEN)) == 4


def test_embedded_lora_adapters_are_peft_folders_built_byte_identical(tmp_path: Path) -> None:
    name = "spmd-dp/tiny-llama-lora-a"
    first, second = (Path(m.resolve_model(name, str(tmp_path / d))) for d in ("one", "two"))
    assert file_hashes(first) == file_hashes(second)
    assert set(file_hashes(first)) == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((first / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and "q_proj" in config["target_modules"]
    other = Path(m.resolve_model("spmd-dp/tiny-llama-lora-b", str(tmp_path / "one")))
    assert file_hashes(other)["adapter_model.safetensors"] != file_hashes(first)["adapter_model.safetensors"]
    assert m.is_embedded_adapter(name) and not m.is_embedded(name)


def test_check_model_refuses_a_local_path_that_does_not_exist(tmp_path: Path) -> None:
    """spmd_dp/models/check.py: a model path that is not there is one line before anything starts; the embedded
    models, an existing folder and the echo engine pass (hub ids: tests/test_model_check.py)."""
    from spmd_dp.config import load_config
    from spmd_dp.errors import UsageError
    from spmd_dp.models.check import check_model

    with pytest.raises(UsageError, match=r"model_name='/nonexistent/m' does not exist"):
        check_model(load_config(["model_name=/nonexistent/m"]))
    for ok in (["model_name=spmd-dp/tiny-llama"], [f"model_name={tmp_path}"],
               ["model_name=/nonexistent/m", "inference_engine=echo"]):
        check_model(load_config(ok))
