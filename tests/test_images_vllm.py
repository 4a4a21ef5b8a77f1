"""Images on real vLLM (CPU): a tiny Idefics3 (SmolVLM's architecture) with dummy weights, the one vision family of
vLLM 0.32 CPU here whose modules import no torchvision (spmd_dp/models/vision.py). Its processor cuts each image
into tiles of 56 pixels (after resizing the longest edge to 112) plus a global view, 4 image tokens each: how many
tokens a prompt gets tells which images vLLM's own processor was given. The run is shared (tests/vllm_jobs.py: node
`images` of job one_rank_a, its records in vllm_jobs.image_node)."""

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3600)]  # it may wait for the shared runs


@pytest.mark.vllm("one_rank_a")
def test_chat_parts_image_field_and_multi_modal_data_through_vllm(vllm_runs):
    from transformers import AutoTokenizer

    run = vllm_runs["one_rank_a"]
    tok = AutoTokenizer.from_pretrained(run.out.parent / "idefics3-tiny")
    words = tok.encode("the weather", add_special_tokens=False)
    assert "limit_mm_per_prompt={'image': 2}" in run.section("images")  # vLLM's own argument
    rows = {r["id"]: r for r in run.rows("images")}
    meta = {k: r["images_metadata"] for k, r in rows.items()}
    assert {k: m.get("images") for k, m in meta.items()} == {
        "one": [[96, 40]], "two": [[96, 40], [60, 60]], "url": [[96, 40]], "none": None, "ids": [[60, 60]]}
    assert all(isinstance(r["images"], str) and m["output_tokens"] == 4 for r, m in zip(rows.values(), meta.values()))
    tokens = {k: m["prompt_tokens"] for k, m in meta.items()}
    # the same chat with an image of 3 tiles, then one more of 5 tiles: 12 and then 20 image tokens more
    wide, square = tokens["one"] - tokens["none"], tokens["two"] - tokens["one"]
    assert wide > 12 and square > 20 and square - wide >= 8, tokens
    assert tokens["url"] == tokens["one"]  # a data: URL of the same size: the same prompt length
    assert tokens["ids"] == len(words) + square  # the <image> token expanded by vLLM's processor
    errors = run.rows("images", "errors.jsonl")
    assert [e["key"] for e in errors] == ["no_placeholder"]
    assert "rejected by the engine" in errors[0]["error"] and "image placeholders" in errors[0]["error"], errors
