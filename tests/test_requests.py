"""Per-record requests with the echo engine and pure logic: options validated during the input scan,
the long-prompt policies, retries, the OpenAI Batch format's shape, list columns in Parquet. (The long-prompt
decision alone: tests/test_context.py; the OpenAI format alone: tests/test_openai_batch.py.)
(What vLLM itself does with them: tests/test_requests_vllm.py.)"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spmd_dp.config import load_config
from spmd_dp.errors import UsageError
from spmd_dp.inputs import RecordSpec, scan_input
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.prompting.options import record_seed
from spmd_dp.testing import REPO, echo_args, read_jsonl, spmd, write_jsonl
from tests.helpers import one_line

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
DATA = REPO / "tests" / "data"


def scan_errors(tmp_path, records, *overrides):
    """The scan's verdict on each record (None: valid), as rank 0 gives it before any model loads."""
    cfg = load_config([*overrides])
    inp = write_jsonl(tmp_path / "scan.jsonl", records)
    _, bad = scan_input(inp, RecordSpec(cfg.primary_key, PromptBuilder(cfg).check), 4, skip_bad=True)
    reasons = {b.position: b.reason for b in bad}
    return [reasons.get(i) for i in range(len(records))]


BAD_RECORDS = [
    ({"generation_options": {"structured_outputs": {"json": {"type": "nonsense"}}}},
     "'generation_options.structured_outputs': json does not compile: Unsupported type \"nonsense\""),
    ({"generation_options": {"structured_outputs": {"regex": "[0-9"}}}, "regex does not compile"),
    ({"generation_options": {"structured_outputs": {"grammar": "root ::= ("}}}, "grammar does not compile"),
    ({"generation_options": {"structured_outputs": {"json": "{not json"}}}, "json is not a JSON schema"),
    ({"generation_options": {"structured_outputs": {"choice": []}}}, "choice must be a non-empty list of strings"),
    ({"generation_options": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "give exactly one of"),
    ({"generation_options": {"logprobs": -1}}, "'generation_options.logprobs' must be an integer >= 0"),
    ({"on_long_prompt": "truncate_middle"}, "'on_long_prompt' is 'truncate_middle'; use one of fail, skip"),
    ({"max_retries": -2}, "'max_retries' must be an integer >= 0"),
    ({"clamp_max_tokens": "yes"}, "'clamp_max_tokens' must be true or false"),
    ({"pooling_options": {"normalize": True}}, "'pooling_options' must be an object with fields among"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]},
     "image 1 (x.png): cannot read"),
]


def test_record_options_are_checked_by_the_scan(tmp_path):
    good = [{"id": 0, "prompt": "a", "generation_options": {"structured_outputs": {"json": SCHEMA}, "logprobs": 2}},
            {"id": 1, "prompt": "a", "generation_options": {"structured_outputs": {"regex": "[0-9]{3}"}}},
            {"id": 2, "prompt": "a", "generation_options": {"structured_outputs": {"choice": ["yes", "no"]}}},
            {"id": 3, "prompt": "a", "generation_options": {"structured_outputs": {"grammar": 'root ::= "x"'}}},
            {"id": 4, "prompt": "a", "on_long_prompt": "truncate_left", "clamp_max_tokens": True, "max_retries": 3},
            {"id": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}]
    bad = [{"id": 10 + i, "prompt": "a", **fields} for i, (fields, _) in enumerate(BAD_RECORDS)]
    verdicts = scan_errors(tmp_path, good + bad)
    assert verdicts[:len(good)] == [None] * len(good)
    for verdict, (_, expected) in zip(verdicts[len(good):], BAD_RECORDS):
        assert verdict is not None and expected in verdict, (verdict, expected)


def test_lora_adapter_and_task_fields_per_record(tmp_path):
    records = [{"id": 0, "prompt": "a", "lora_adapter": "a"}, {"id": 1, "prompt": "a", "lora_adapter": "c"},
               {"id": 2, "prompt": "a", "lora_adapter": None},
               {"id": 3, "prompt": "a", "generation_options": {"prompt_logprobs": 1}},
               {"id": 4, "prompt": "a", "task": "embed"}, {"id": 5, "prompt": "a", "task": "classify"}]
    verdicts = scan_errors(tmp_path, records, "+engine_options.lora_adapters.a=/adapters/a",
                           "+engine_options.lora_adapters.b=/adapters/b", "task=[generate,embed]")
    assert verdicts[0] is None and verdicts[2] is None and verdicts[4] is None
    assert "'lora_adapter' is 'c', not one of engine_options.lora_adapters (a, b)" in verdicts[1]
    assert "prompt_logprobs with LoRA adapters" in verdicts[3]
    assert "needs task=classify; this run serves task=['generate', 'embed']" in verdicts[5]
    # with one task, 'task' is the record's own data; an adapter is never served by the base model instead
    none_set = scan_errors(tmp_path, records[:3] + records[4:])
    assert none_set[2:] == [None] * 3
    assert "'lora_adapter' is 'c' but no adapter is configured; name it: +engine_options.lora_adapters.c=" in \
        none_set[1] and "'lora_adapter' is 'a' but no adapter is configured" in none_set[0]


@pytest.mark.slow
def test_an_unknown_adapter_with_none_configured_is_a_bad_record(tmp_path):
    records = [{"id": 0, "prompt": "x y"}, {"id": 3, "prompt": "z", "lora_adapter": "nope"}]
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp))
    assert p.returncode == 2 and "in.jsonl:2: 'lora_adapter' is 'nope' but no adapter is configured" in one_line(p)
    p = spmd(echo_args(tmp_path, inp, "on_bad_record=skip"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")] == [0]
    assert "no adapter is configured" in read_jsonl(tmp_path / "out" / "out.errors.jsonl")[0]["error"]


def test_a_schema_that_does_not_compile_is_exit_2_before_any_model(tmp_path):
    records = [{"id": i, "prompt": "a b c"} for i in range(5)]
    records[3]["generation_options"] = {"structured_outputs": {"json": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": "zero"}}}}}
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp))
    assert p.returncode == 2
    line = one_line(p)
    assert line.startswith("spmd_dp: input error: ") and "in.jsonl:4: 'generation_options.structured_outputs': " \
        "json does not compile" in line and "fix the input" in line, line
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "out.jsonl").exists()


@pytest.mark.parametrize("overrides,expected", [
    (["+generation_options.structured_outputs.json={type: nonsense}"],
     "generation_options.structured_outputs: json does not compile"),
    (["+generation_options.structured_outputs.choice=[]"], "choice must be a non-empty list of strings"),
    (["task=[generate,translate]"], "task=['generate', 'translate'] is not allowed"),
    (["lora_adapter=pirate"], "lora_adapter='pirate' is not allowed; name one of engine_options.lora_adapters"),
    (["+engine_options.lora_adapters.a=/x", "generation_options.prompt_logprobs=1"], "with LoRA adapters"),
    (["on_long_prompt=truncate_left", "engine_options.max_model_len=64", "generation_options.max_tokens=64"],
     "keeps max_model_len - max_tokens prompt tokens"),
    (["input_format=openai_batch", "output_format=parquet"], "OpenAI batch output files are JSONL"),
    (["input_format=csv"], "input_format='csv' is not allowed"),
])
def test_config_level_options_are_checked(overrides, expected):
    with pytest.raises(UsageError) as e:
        PromptBuilder(load_config(overrides))
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_schema_file_and_config_level_constraint(tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    cfg = load_config([f"+generation_options.structured_outputs.json={tmp_path / 'schema.json'}"])
    req = PromptBuilder(cfg).request("0:0", {"id": 1, "prompt": "x"}, {"max_tokens": 4, "structured_outputs":
                                                                      cfg.generation_options.structured_outputs})
    assert req.sampling["structured_outputs"] == {"json": SCHEMA}
    own = PromptBuilder(cfg).request("0:1", {"id": 2, "prompt": "x", "generation_options": {
        "structured_outputs": {"choice": ["a"]}}}, {"structured_outputs": {"json": SCHEMA}})
    assert own.sampling["structured_outputs"] == {"choice": ["a"]}  # the record's own wins


def test_long_prompt_policies_and_clamp_with_echo(tmp_path):
    """Echo words stand for tokens: max_model_len=10, max_tokens=3."""
    words = " ".join(f"w{i}" for i in range(14))
    records = [{"id": "fail", "prompt": words},
               {"id": "left", "prompt": words, "on_long_prompt": "truncate_left"},
               {"id": "right", "prompt": words, "on_long_prompt": "truncate_right"},
               {"id": "skip", "prompt": words, "on_long_prompt": "skip"},
               {"id": "fits", "prompt": "a b c d e f g h"},  # leaves 2 < 3: runs as it is (vLLM stops at the end)
               {"id": "cut", "prompt": "a b c d e f g h", "on_long_prompt": "truncate_left"},
               {"id": "clamp", "prompt": "a b c d e f g h", "on_long_prompt": "truncate_left", "clamp_max_tokens": True}]
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp, "generation_options.max_tokens=3", "engine_options.max_model_len=10",
                       "on_bad_record=skip", "return_metadata=true"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "out.jsonl")}
    assert rows["left"]["out"] == "w7 w8 w9" and rows["left"]["out_metadata"]["truncated_from"] == 14  # last 7 kept
    assert rows["right"]["out"] == "w0 w1 w2" and rows["right"]["out_metadata"]["prompt_tokens"] == 7
    assert rows["fits"]["out"] == "a b" and "truncated_from" not in rows["fits"]["out_metadata"]
    assert rows["cut"]["out"] == "b c d" and rows["cut"]["out_metadata"]["truncated_from"] == 8
    assert rows["clamp"]["out"] == "a b" and "truncated_from" not in rows["clamp"]["out_metadata"]
    errors = {e["key"]: e["error"] for e in read_jsonl(tmp_path / "out" / "out.errors.jsonl")}
    assert set(errors) == {"fail", "skip"} and "skipped: the prompt (14 words)" in errors["skip"]
    assert errors["fail"].startswith("rejected by the engine")
    # on_long_prompt=skip goes to the errors file even when on_bad_record=fail: the run goes on
    p = spmd(echo_args(tmp_path, inp, "generation_options.max_tokens=3", "engine_options.max_model_len=10",
                       "on_long_prompt=skip", "name=all_skip"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert {e["key"] for e in read_jsonl(tmp_path / "out" / "all_skip.errors.jsonl")} == {"fail", "skip"}


def test_retries_with_echo(tmp_path):
    records = [{"id": f"r{i}", "prompt": f"p{i} a b"} for i in range(8)]
    records[5]["max_retries"] = 0  # its own: no retry
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    fail = ["engine_options.echo_fail_keys=[r2,r5]", "engine_options.echo_fail_times=1", "batch_size=3"]
    # r2 fails once and succeeds on its retry; r5 (max_retries=0) goes to the errors file
    p = spmd(echo_args(tmp_path, inp, *fail, "max_retries=1", "on_bad_record=skip", "return_metadata=true"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "out.jsonl")}
    assert rows["r2"]["out"] == "p2 a b" and rows["r2"]["out_metadata"]["retries"] == 1
    assert "r5" not in rows and len(rows) == 7
    assert "trying again (1 of max_retries=1)" in p.stderr
    (err,) = read_jsonl(tmp_path / "out" / "out.errors.jsonl")
    assert err["key"] == "r5" and err["error"].startswith("failed in the engine: echo engine: injected failure")
    # without retries the failure ends the run (on_bad_record=fail): exit 1 naming the record and the tries
    p = spmd(echo_args(tmp_path, inp, *fail, "name=no_retry"))
    assert p.returncode == 1
    assert "record id='r2'" in p.stderr and "failed in the engine (1 tries: max_retries=0)" in p.stderr


def test_openai_batch_format_with_echo(tmp_path):
    """The Batch guide's requests under 2 ranks: one output line per custom_id, in input order, bodies shaped
    as the API's; a request the engine refuses is an error line; a body that cannot be mapped is exit 2."""
    src = DATA / "openai_batch_chat_embeddings.jsonl"
    lines = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    long = {"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
            "body": {"model": "x", "prompt": " ".join(["word"] * 50), "logprobs": 1, "max_tokens": 2}}
    cmpl = {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
            "body": {"model": "x", "prompt": "one two three", "logprobs": 1, "max_tokens": 2}}
    inp = write_jsonl(tmp_path / "data" / "batch.jsonl", lines + [long, cmpl])
    args = [f"data_dir={inp.parent}", f"input_data_path={inp.name}", f"output_dir={tmp_path / 'out'}", "name=res",
            "inference_engine=echo", "input_format=openai_batch", "task=[generate,embed]", "batch_size=2",
            "engine_options.max_model_len=40"]
    p = spmd(args, nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    out = read_jsonl(tmp_path / "out" / "res.jsonl")
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines] + ["too-long", "cmpl"]
    by_id = {o["custom_id"]: o for o in out}
    for line in lines:
        o = by_id[line["custom_id"]]
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
        body = o["response"]["body"]
        if line["url"] == "/v1/chat/completions":
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
            last_user = [m["content"] for m in line["body"]["messages"] if m["role"] == "user"][-1]
            assert body["choices"][0]["message"]["content"] == last_user  # the echo engine's answer
            assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        else:
            assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
            assert len(body["data"][0]["embedding"]) == 8
    assert by_id["request-2"]["response"]["body"]["data"] == by_id["request-4"]["response"]["body"]["data"]
    err = by_id["too-long"]
    assert err["response"]["status_code"] == 400 and err["response"]["body"] is None
    assert err["error"]["code"] == "invalid_request" and "longer than max_model_len=40" in err["error"]["message"]
    lp = by_id["cmpl"]["response"]["body"]["choices"][0]
    assert lp["text"] == "one two" and lp["logprobs"]["tokens"] == ["one", "two"]
    assert lp["logprobs"]["text_offset"] == [0, 3]
    # a body that cannot be mapped is refused during the scan: exit 2, one line naming the line and the fix
    bad = dict(lines[0], custom_id="bad", body={"model": "x", "messages": [{"role": "user", "content": "hi"}],
                                                 "tools": [{"type": "function"}]})
    inp2 = write_jsonl(tmp_path / "data" / "bad.jsonl", lines[:2] + [bad])
    p = spmd([*args[:1], f"input_data_path={inp2.name}", *args[2:]])
    assert p.returncode == 2
    line = one_line(p)
    assert "bad.jsonl:3: OpenAI request: body.tools: tool calls are not supported; remove it" in line, line


def test_parquet_list_columns(tmp_path):
    records = [{"id": i, "prompt": f"a{i} b c d", "generation_options": {"logprobs": 1}} for i in range(4)]
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp, "output_format=parquet", "return_token_ids=true"))
    assert p.returncode == 0, p.stderr[-3000:]
    table = pq.read_table(tmp_path / "out" / "out.parquet")
    assert table.schema.field("out_token_ids").type == pa.list_(pa.int64())
    assert table.schema.field("out_logprobs").type == pa.struct([
        ("logprobs", pa.list_(pa.float32())), ("top_ids", pa.list_(pa.list_(pa.int64()))),
        ("top_logprobs", pa.list_(pa.list_(pa.float32())))])
    assert table.column("out").to_pylist() == [f"a{i} b c d" for i in range(4)]
    p = spmd(echo_args(tmp_path, inp, "output_format=parquet", "task=embed", "name=emb"))
    assert p.returncode == 0, p.stderr[-3000:]
    table = pq.read_table(tmp_path / "out" / "emb.parquet")
    assert table.schema.field("emb").type == pa.list_(pa.float32())
    assert all(len(v) == 8 for v in table.column("emb").to_pylist())


def test_openai_body_maps_onto_vllm_options():
    b = PromptBuilder(load_config(["input_format=openai_batch", "+engine_options.lora_adapters.pirate=/x"]))
    line = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
        "max_completion_tokens": 20, "temperature": 0.2, "top_p": 0.9, "n": 2, "stop": ["\n"], "seed": 7,
        "logprobs": True, "top_logprobs": 4, "user": "ignored", "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "strict": True, "schema": SCHEMA}}}}
    req = b.request("0:0", line, {"temperature": 0.7, "max_tokens": 512})
    assert req.key == "c1" and req.lora == "pirate" and req.task == "generate"
    assert req.sampling == {"temperature": 0.2, "max_tokens": 20, "top_p": 0.9, "n": 2, "stop": ["\n"],
                            "seed": record_seed(7, "c1"),  # the line's seed, made the record's own
                            "logprobs": 4, "structured_outputs": {"json": SCHEMA}}
    emb = b.request("0:1", {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                            "body": {"input": ["one text"], "dimensions": 4}}, {})
    assert (emb.task, emb.prompt, emb.pooling) == ("embed", "one text", {"dimensions": 4})
    cases = {
        "body.input must be one text or one list of token ids": {"url": "/v1/embeddings", "body": {"input": ["a", "b"]}},
        "'url' is '/v1/responses'": {"url": "/v1/responses", "body": {"input": "x"}},
        "body.messages is missing": {"url": "/v1/chat/completions", "body": {"prompt": "x"}},
        "must not be sent in stream mode": {"url": "/v1/completions", "body": {"prompt": "x", "stream": True}},
        "response_format.type is 'xml'": {"url": "/v1/completions", "body": {"prompt": "x",
                                                                          "response_format": {"type": "xml"}}},
    }
    for expected, line in cases.items():
        why = b.check({"custom_id": "x", "method": "POST", **line})
        assert why is not None and expected in why, (expected, why)
