"""Images on real vLLM (CPU): a tiny Idefics3 (SmolVLM's architecture) with dummy weights, the one vision family of
vLLM 0.32 CPU here whose modules import no torchvision (spmd_dp/models/vision.py). Its processor cuts each image
into tiles of 56 pixels (after resizing the longest edge to 112) plus a global view, 4 image tokens each: how many
tokens a prompt gets tells which images vLLM's own processor was given. One engine start (~60-90 s)."""

import base64

import pytest
from transformers import AutoTokenizer

from spmd_dp.models.vision import write_folder
from spmd_dp.testing import image_bytes, read_jsonl, spmd, write_jsonl

pytestmark = pytest.mark.vllm


def test_chat_parts_image_field_and_multi_modal_data_through_vllm(tmp_path):
    model = tmp_path / "idefics3-tiny"
    write_folder("idefics3-tiny", model)
    d = tmp_path / "data"
    d.mkdir()
    (d / "wide.png").write_bytes(image_bytes(96, 40))  # 112x47: 2x1 tiles + the global one
    (d / "square.jpg").write_bytes(image_bytes(60, 60, "JPEG"))  # 112x112: 2x2 tiles + the global one
    url = "data:image/png;base64," + base64.b64encode(image_bytes(96, 40, seed=3)).decode()
    tok = AutoTokenizer.from_pretrained(model)
    image, words = tok.convert_tokens_to_ids("<image>"), tok.encode("the weather", add_special_tokens=False)
    question = "What is in the picture?"
    records = [
        {"id": "one", "prompt": question, "image": "wide.png"},
        {"id": "two", "prompt": question, "image": ["wide.png", "square.jpg"]},
        {"id": "url", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]},
        {"id": "none", "prompt": question, "image": None},
        {"id": "ids", "prompt": [image] + words, "image": "square.jpg"},  # vLLM's multi_modal_data with token ids
        {"id": "no_placeholder", "prompt": words, "image": "square.jpg"},
    ]
    write_jsonl(d / "in.jsonl", records)
    p = spmd([f"data_dir={d}", "input_data_path=in.jsonl", f"output_dir={tmp_path / 'out'}", "name=out",
              f"model_name={model}", "+engine_options.vllm_kwargs.load_format=dummy",
              "engine_options.max_model_len=1024", "engine_options.limit_mm_per_prompt=2", "image_field=image",
              "chat=true", "return_metadata=true", "on_bad_record=skip", "generation_options.max_tokens=4",
              "generation_options.temperature=0", "batch_size=2"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "limit_mm_per_prompt={'image': 2}" in p.stderr  # vLLM's own argument
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "out.jsonl")}
    meta = {k: r["out_metadata"] for k, r in rows.items()}
    assert {k: m.get("images") for k, m in meta.items()} == {
        "one": [[96, 40]], "two": [[96, 40], [60, 60]], "url": [[96, 40]], "none": None, "ids": [[60, 60]]}
    assert all(isinstance(r["out"], str) and m["output_tokens"] == 4 for r, m in zip(rows.values(), meta.values()))
    tokens = {k: m["prompt_tokens"] for k, m in meta.items()}
    # the same chat with an image of 3 tiles, then one more of 5 tiles: 12 and then 20 image tokens more
    wide, square = tokens["one"] - tokens["none"], tokens["two"] - tokens["one"]
    assert wide > 12 and square > 20 and square - wide >= 8, tokens
    assert tokens["url"] == tokens["one"]  # a data: URL of the same size: the same prompt length
    assert tokens["ids"] == len(words) + square  # the <image> token expanded by vLLM's processor
    errors = read_jsonl(tmp_path / "out" / "out.errors.jsonl")
    assert [e["key"] for e in errors] == ["no_placeholder"]
    assert "rejected by the engine" in errors[0]["error"] and "image placeholders" in errors[0]["error"], errors
