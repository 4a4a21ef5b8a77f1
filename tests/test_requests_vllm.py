"""Per-record requests on real vLLM (CPU) with the embedded models: structured outputs, logprobs, long
prompts, LoRA adapters, the OpenAI Batch format, embeddings, classification, scores and rewards.
Each engine start costs ~20-30 s: the runs are shared (tests/vllm_jobs.py), each test reads its nodes."""

import json
import math
import re

import jsonschema
import pytest
from tests.vllm_jobs import BATCH, CHOICES, PROMPTS, REGEX, SCHEMA, structured_records

# the first test waits for all the shared runs (each job ends within 900 s)
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3600)]


def tokenizer(model="spmd-dp/tiny-llama"):
    from transformers import AutoTokenizer

    from spmd_dp.models.embedded import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


@pytest.mark.vllm("two_ranks")
def test_structured_outputs_logprobs_and_long_prompts_on_two_ranks(vllm_runs):
    """Node so: temperature 0.8, max_tokens 24, max_model_len 128, return_metadata, schedule static."""
    rows = {r["id"]: r for r in vllm_runs["two_ranks"].rows("so")}
    assert len(rows) == len(structured_records())
    assert {r["so_metadata"]["rank"] for r in rows.values()} == {0, 1}
    for i in range(len(PROMPTS)):
        jsonschema.validate(json.loads(rows[f"json{i}"]["so"]), SCHEMA)
        assert re.fullmatch(REGEX, rows[f"regex{i}"]["so"]), rows[f"regex{i}"]["so"]
        assert rows[f"choice{i}"]["so"] in CHOICES
        assert rows[f"grammar{i}"]["so"] in ("xy!", "xz!")
    assert not re.fullmatch(REGEX, rows["plain"]["so"])  # unconstrained text is gibberish
    tok = tokenizer()
    for i, prompt in enumerate(PROMPTS):
        r = rows[f"lp{i}"]
        ids, lp = r["so_token_ids"], r["so_logprobs"]
        assert len(ids) == r["so_metadata"]["output_tokens"] == len(lp["logprobs"]) > 0
        assert all(len(top) == 3 for top in lp["top_ids"]) and all(len(t) == 3 for t in lp["top_logprobs"])
        assert tok.decode(ids) == r["so"]  # the ids are the text
        for chosen, top in zip(lp["logprobs"], lp["top_logprobs"]):
            assert chosen <= 0 and top == sorted(top, reverse=True) and chosen <= top[0] + 1e-6
        plp = r["so_prompt_logprobs"]
        assert plp["token_ids"] == tok(prompt)["input_ids"]  # the prompt, BOS first
        assert plp["logprobs"][0] is None and all(x <= 0 for x in plp["logprobs"][1:])
        assert all(len(t) == 2 for t in plp["top_ids"][1:])
    left = rows["left"]["so_metadata"]
    assert left["truncated_from"] > 128 and left["prompt_tokens"] == 128 - 24  # room for max_tokens kept
    assert rows["left"]["so"]


@pytest.mark.vllm("one_rank_a", "one_rank_b")
def test_lora_adapters_mixed_in_one_run_equal_each_alone(vllm_runs):
    """Two locally made adapters (random weights, fixed seed) change the greedy outputs; base-model records
    and both adapters share one engine (node lora_mixed), and each record gets what an engine with only its
    adapter gives (nodes lora_a, lora_b: that adapter alone, base-model records beside it)."""
    a_run, b_run = vllm_runs["one_rank_a"], vllm_runs["one_rank_b"]
    out = {r["id"]: r["lora_mixed"] for r in a_run.rows("lora_mixed")}
    alone = {"a": {r["id"]: r["lora_a"] for r in a_run.rows("lora_a")},
             "b": {r["id"]: r["lora_b"] for r in b_run.rows("lora_b")}}
    for i in range(len(PROMPTS)):
        assert out[f"a{i}"] == alone["a"][f"a{i}"] and out[f"b{i}"] == alone["b"][f"b{i}"]
        assert out[f"base{i}"] == alone["a"][f"base{i}"] == alone["b"][f"base{i}"]
        assert len({out[f"base{i}"], out[f"a{i}"], out[f"b{i}"]}) == 3, i  # each adapter changes the output


@pytest.mark.vllm("two_ranks")
def test_openai_batch_chat_and_embeddings_on_two_ranks(vllm_runs):
    """The Batch guide's requests (tests/data) plus one too long for the context, under 2 ranks with one
    generate and one embed engine per rank (node results): every custom_id once, in input order, with its
    response."""
    run = vllm_runs["two_ranks"]
    # static, batch_size=3: records 0-3 on rank 0 (batches 0, 1), 4-6 on rank 1 (batch 2); request-2 and request-4
    # embed the same text, one on each rank
    log = run.section("results")
    assert "Received results for batch 2 from rank 1" in log and "batch 0 from rank 0" in log
    out = run.rows("results")
    assert [o["custom_id"] for o in out] == ["too-long"] + [x["custom_id"] for x in BATCH]
    by_id = {o["custom_id"]: o for o in out}
    err = by_id["too-long"]
    assert err["response"]["status_code"] == 400 and err["response"]["body"] is None
    assert "maximum context length is 256 tokens" in err["error"]["message"]
    tok = tokenizer()
    for line in BATCH:
        o = by_id[line["custom_id"]]
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        if line["url"] == "/v1/chat/completions":
            choice = body["choices"][0]
            assert body["object"] == "chat.completion" and choice["message"]["content"]
            assert choice["finish_reason"] in ("stop", "length")
            prompt = tok.apply_chat_template(line["body"]["messages"], tokenize=False, add_generation_prompt=True)
            assert body["usage"]["prompt_tokens"] == len(tok(prompt, add_special_tokens=False)["input_ids"])
        else:
            vector = body["data"][0]["embedding"]
            assert len(vector) == 128  # the model's hidden size
            assert abs(math.sqrt(sum(v * v for v in vector)) - 1) < 1e-4  # vLLM normalises embeddings
    vec = {i: by_id[f"request-{i}"]["response"]["body"]["data"][0]["embedding"] for i in (2, 4, 5)}
    assert vec[2] == vec[4]  # same text on rank 0 and rank 1: the same float32 vector
    assert vec[2] != vec[5]


@pytest.mark.vllm("one_rank_b")
def test_classify_reward_and_scores(vllm_runs):
    """classify, reward and score share one engine of the 1-label model (node cls): the reward is the raw logit,
    classify its sigmoid, score a cross-encoder's; with the LM, embed and score share one engine (node bi): score
    is then the cosine of the two texts' embeddings (a bi-encoder)."""
    run = vllm_runs["one_rank_b"]
    rows = {r["id"]: r["cls"] for r in run.rows("cls")}
    assert run.section("cls").count("starting vLLM") == 1  # one engine serves the three tasks
    for i in range(len(PROMPTS)):
        (prob,), reward = rows[f"classify{i}"], rows[f"reward{i}"]
        assert isinstance(reward, float) and abs(1 / (1 + math.exp(-reward)) - prob) < 1e-5
    scores = [rows[f"score{i}"] for i in range(len(PROMPTS))]
    assert all(isinstance(s, float) and 0 < s < 1 for s in scores) and len(set(scores)) == len(scores)

    bi = {r["id"]: r["bi"] for r in run.rows("bi")}
    assert run.section("bi").count("starting vLLM") == 1
    for i in range(len(PROMPTS)):
        q, d = bi[10], bi[10 + i]
        cosine = sum(a * b for a, b in zip(q, d)) / math.sqrt(sum(a * a for a in q) * sum(b * b for b in d))
        assert abs(bi[i] - cosine) < 1e-4, (i, bi[i], cosine)
    assert abs(bi[0] - 1) < 1e-4  # a text against itself
