"""Per-record requests on real vLLM (CPU) with the embedded models: structured outputs, logprobs, long
prompts, LoRA adapters, the OpenAI Batch format, embeddings, classification, scores and rewards.
Each engine start costs ~20-30 s: each run checks several options at once."""

import json
import math
import re

import jsonschema
import pytest

from spmd_dp.testing import REPO, read_jsonl, spmd, write_jsonl

pytestmark = pytest.mark.vllm

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "label": {"enum": ["cat", "dog", "bird"]}},
          "required": ["ok", "label"], "additionalProperties": False}
REGEX = "[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe"]
PROMPTS = ["The weather today is", "Tell me about rain", "Once upon a time", "What is a cloud?"]


def run_args(tmp_path, inp, name, *extra):
    return [f"data_dir={inp.parent}", f"input_data_path={inp.name}", f"output_dir={tmp_path / 'out'}",
            f"name={name}", "batch_size=4", *extra]


def tokenizer(model="spmd-dp/tiny-llama"):
    from transformers import AutoTokenizer

    from spmd_dp.models.embedded import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def test_structured_outputs_logprobs_and_long_prompts_on_two_ranks(tmp_path):
    records = []
    for i, p in enumerate(PROMPTS):
        records += [
            {"id": f"json{i}", "prompt": p, "generation_options": {"structured_outputs": {"json": SCHEMA}, "max_tokens": 64}},
            {"id": f"regex{i}", "prompt": p, "generation_options": {"structured_outputs": {"regex": REGEX}}},
            {"id": f"choice{i}", "prompt": p, "generation_options": {"structured_outputs": {"choice": CHOICES}}},
            {"id": f"grammar{i}", "prompt": p,
             "generation_options": {"structured_outputs": {"grammar": 'root ::= "x" ("y" | "z") "!"'}}},
        ]
    records += [{"id": f"lp{i}", "prompt": p, "generation_options": {"logprobs": 3, "prompt_logprobs": 2}}
                for i, p in enumerate(PROMPTS)]
    long = " ".join(["rain"] * 150)  # ~200 tokens: longer than max_model_len=128
    records += [{"id": "left", "prompt": long, "on_long_prompt": "truncate_left"},
                {"id": "plain", "prompt": "Tell me"}]
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(run_args(tmp_path, inp, "so", "generation_options.temperature=0.8", "generation_options.max_tokens=24",
                      "engine_options.max_model_len=128", "return_metadata=true", "schedule=static",
                      # xgrammar takes whitespace from the engine's config, not the request's
                      "+engine_options.vllm_kwargs.structured_outputs_config={backend:xgrammar,disable_any_whitespace:true}"),
             nproc=2, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "so.jsonl")}
    assert len(rows) == len(records)
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


def test_lora_adapters_mixed_in_one_run_equal_each_alone(tmp_path):
    """Two locally made adapters (random weights, fixed seed) change the greedy outputs; base-model records
    and both adapters share one engine, and each record gets what a run with only its adapter gives."""
    adapters = ["+engine_options.lora_adapters.a=spmd-dp/tiny-llama-lora-a",
                "+engine_options.lora_adapters.b=spmd-dp/tiny-llama-lora-b"]
    greedy = ["generation_options.temperature=0", "generation_options.max_tokens=12",
              "engine_options.max_model_len=256"]
    mixed = [{"id": f"{who}{i}", "prompt": p, **({"lora_adapter": who} if who != "base" else {})}
             for i, p in enumerate(PROMPTS) for who in ("base", "a", "b")]
    inp = write_jsonl(tmp_path / "data" / "mixed.jsonl", mixed)
    p = spmd(run_args(tmp_path, inp, "mixed", *adapters, *greedy), timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    out = {r["id"]: r["mixed"] for r in read_jsonl(tmp_path / "out" / "mixed.jsonl")}
    alone = {}
    for who, other in (("a", "b"), ("b", "a")):
        # only this adapter in the engine; base-model records beside it
        recs = [{"id": f"{who}{i}", "prompt": p} for i, p in enumerate(PROMPTS)] + \
               [{"id": f"base{i}", "prompt": p, "lora_adapter": None} for i, p in enumerate(PROMPTS)]
        inp = write_jsonl(tmp_path / "data" / f"{who}.jsonl", recs)
        only = [a for a in adapters if f".{other}=" not in a]
        p = spmd(run_args(tmp_path, inp, who, *only, f"lora_adapter={who}", *greedy), timeout=900)
        assert p.returncode == 0, p.stderr[-4000:]
        alone[who] = {r["id"]: r[who] for r in read_jsonl(tmp_path / "out" / f"{who}.jsonl")}
    for i in range(len(PROMPTS)):
        assert out[f"a{i}"] == alone["a"][f"a{i}"] and out[f"b{i}"] == alone["b"][f"b{i}"]
        assert out[f"base{i}"] == alone["a"][f"base{i}"] == alone["b"][f"base{i}"]
        assert len({out[f"base{i}"], out[f"a{i}"], out[f"b{i}"]}) == 3, i  # each adapter changes the output


def test_openai_batch_chat_and_embeddings_on_two_ranks(tmp_path):
    """The Batch guide's requests (tests/data) plus one too long for the context, under 2 ranks with one
    generate and one embed engine per rank: every custom_id once, in input order, with its response."""
    lines = read_jsonl(REPO / "tests" / "data" / "openai_batch_chat_embeddings.jsonl")
    too_long = {"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": " ".join(["rain"] * 300)}]}}
    inp = write_jsonl(tmp_path / "data" / "batch.jsonl", [too_long] + lines)
    # static: records 0-3 on rank 0 (batches 0, 1), 4-6 on rank 1 (batch 2); request-2 and request-4 embed the
    # same text, one on each rank
    p = spmd(run_args(tmp_path, inp, "results", "input_format=openai_batch", "task=[generate,embed]",
                      "schedule=static", "batch_size=3", "generation_options.temperature=0",
                      "engine_options.max_model_len=256"), nproc=2, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "Received results for batch 2 from rank 1" in p.stderr and "batch 0 from rank 0" in p.stderr
    out = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [o["custom_id"] for o in out] == ["too-long"] + [x["custom_id"] for x in lines]
    by_id = {o["custom_id"]: o for o in out}
    err = by_id["too-long"]
    assert err["response"]["status_code"] == 400 and err["response"]["body"] is None
    assert "maximum context length is 256 tokens" in err["error"]["message"]
    tok = tokenizer()
    for line in lines:
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


def test_classify_reward_and_scores(tmp_path):
    """classify, reward and score share one engine of the 1-label model: the reward is the raw logit, classify
    its sigmoid, score a cross-encoder's; with the LM, embed and score share one engine: score is then the
    cosine of the two texts' embeddings (a bi-encoder)."""
    recs = [{"id": f"{t}{i}", "prompt": p, "task": t} for i, p in enumerate(PROMPTS) for t in ("classify", "reward")]
    recs += [{"id": f"score{i}", "prompt": PROMPTS[0], "document": d, "task": "score"} for i, d in enumerate(PROMPTS)]
    inp = write_jsonl(tmp_path / "data" / "cls.jsonl", recs)
    p = spmd(run_args(tmp_path, inp, "cls", "model_name=spmd-dp/tiny-llama-reward", "task=[classify,reward,score]"),
             timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stderr.count("starting vLLM") == 1  # one engine serves the three tasks
    rows = {r["id"]: r["cls"] for r in read_jsonl(tmp_path / "out" / "cls.jsonl")}
    for i in range(len(PROMPTS)):
        (prob,), reward = rows[f"classify{i}"], rows[f"reward{i}"]
        assert isinstance(reward, float) and abs(1 / (1 + math.exp(-reward)) - prob) < 1e-5
    scores = [rows[f"score{i}"] for i in range(len(PROMPTS))]
    assert all(isinstance(s, float) and 0 < s < 1 for s in scores) and len(set(scores)) == len(scores)

    pairs = [{"id": i, "prompt": PROMPTS[0], "document": d, "task": "score"} for i, d in enumerate(PROMPTS)]
    pairs += [{"id": 10 + i, "prompt": t, "task": "embed"} for i, t in enumerate(PROMPTS)]
    inp = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs)
    p = spmd(run_args(tmp_path, inp, "bi", "task=[embed,score]"), timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stderr.count("starting vLLM") == 1
    bi = {r["id"]: r["bi"] for r in read_jsonl(tmp_path / "out" / "bi.jsonl")}
    for i in range(len(PROMPTS)):
        q, d = bi[10], bi[10 + i]
        cosine = sum(a * b for a, b in zip(q, d)) / math.sqrt(sum(a * a for a in q) * sum(b * b for b in d))
        assert abs(bi[i] - cosine) < 1e-4, (i, bi[i], cosine)
    assert abs(bi[0] - 1) < 1e-4  # a text against itself
