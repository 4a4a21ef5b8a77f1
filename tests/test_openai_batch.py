"""The OpenAI Batch file format (spmd_dp/prompting/openai_batch.py), in and out, without an engine: a request line
becomes a record of spmd_dp's shape or one error naming the field and the fix; a completion becomes the API's
output line (ids stable per custom_id, usage, logprobs in the API's shape, an error line with its status)."""

import pytest

from spmd_dp.engines.base import FAILED, REJECTED, Completion, Logprobs
from spmd_dp.prompting.openai_batch import BodyError, output_record, to_record


def rec(url, body, **line):
    return to_record({"custom_id": "c", "method": "POST", "url": url, "body": body, **line}, "messages", "prompt",
                     {"pirate": "/adapters/pirate"})


def test_request_lines_become_records():
    chat = rec("/v1/chat/completions", {"model": "pirate", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 9, "logprobs": True, "top_logprobs": 2, "temperature": None,
                                        "response_format": {"type": "json_object"}})
    assert chat == {"custom_id": "c", "task": "generate", "lora_adapter": "pirate",
                    "messages": [{"role": "user", "content": "hi"}],
                    "generation_options": {"max_tokens": 9, "logprobs": 2, "structured_outputs": {"json_object": True}}}
    cmpl = rec("/v1/completions", {"model": "base", "prompt": [[1, 2, 3]], "logprobs": 0,
                                   "response_format": {"type": "text"}})
    assert cmpl["prompt"] == [1, 2, 3] and "lora_adapter" not in cmpl  # a model that is no adapter: the run's model
    assert cmpl["generation_options"]["logprobs"] == 0  # completions: logprobs is k itself
    assert cmpl["generation_options"].get("structured_outputs") is None  # response_format text: no constraint
    assert rec("/v1/completions", {"prompt": "x"}) == {"custom_id": "c", "task": "generate", "prompt": "x"}
    emb = rec("/v1/embeddings", {"input": "text", "dimensions": 4})
    assert emb == {"custom_id": "c", "task": "embed", "prompt": "text", "pooling_options": {"dimensions": 4}}


@pytest.mark.parametrize("line,why", [
    ({"custom_id": ""}, "'custom_id' must be a non-empty string"),
    ({"method": "GET"}, "'method' is 'GET'; the Batch API sends POST"),
    ({"url": "/v1/responses"}, "'url' is '/v1/responses'; supported: /v1/chat/completions"),
    ({"body": "x"}, "'body' must be an object"),
    ({"body": {"prompt": "x", "tools": [{"type": "function"}]}}, "body.tools: tool calls are not supported; remove it"),
    ({"body": {"prompt": "x", "echo": True}}, "body.echo: echo are not supported"),
    ({"body": {"prompt": "x", "stream": True}}, "body.stream: a batch request must not be sent in stream mode"),
    ({"body": {"prompt": ["a", "b"]}}, "body.prompt must be one text or one list of token ids"),
    ({"body": {"prompt": [1, True]}}, "body.prompt must be one text"),
    ({"body": {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {}}}},
     "body.response_format.json_schema.schema must be a JSON schema object"),
    ({"url": "/v1/embeddings", "body": {"input": "x", "encoding_format": "base64"}},
     "body.encoding_format='base64': only 'float' is written"),
    ({"url": "/v1/chat/completions", "body": {"prompt": "x"}}, "body.messages is missing"),
])
def test_a_line_that_cannot_be_mapped_names_the_field_and_the_fix(line, why):
    full = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}, **line}
    with pytest.raises(BodyError) as e:
        to_record(full, "messages", "prompt", {})
    assert why in str(e.value)


def test_a_completion_becomes_the_apis_output_line():
    line = {"custom_id": "req-7", "url": "/v1/chat/completions"}
    lp = Logprobs([-0.5], [[11, 12]], [[-0.5, -1.0]], tokens=["é"], top_tokens=[["é", "e"]])
    out = output_record(line, Completion("0:0", ["é", "no"], prompt_tokens=3, output_tokens=2, finish_reason="stop",
                                         finish_reasons=["stop", "length"], logprobs=[lp, lp]), "m")
    again = output_record(line, Completion("0:0", ["other"]), "m")
    assert out["id"] == again["id"] and out["id"].startswith("batch_req_")  # stable per custom_id
    assert out["custom_id"] == "req-7" and out["error"] is None and out["response"]["status_code"] == 200
    body = out["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "m" and body["id"].startswith("chatcmpl-")
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]  # each completion its own
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "é"}
    assert body["choices"][0]["logprobs"] == {"content": [{"token": "é", "bytes": [195, 169], "logprob": -0.5,
                                                           "top_logprobs": [
                                                               {"token": "é", "bytes": [195, 169], "logprob": -0.5},
                                                               {"token": "e", "bytes": [101], "logprob": -1.0}]}]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_completions_and_embeddings_lines():
    lp = Logprobs([-0.1, -0.2], [[1], [2]], [[-0.1], [-0.2]], tokens=["ab", "c"], top_tokens=[["ab"], ["c"]])
    cmpl = output_record({"custom_id": "x", "url": "/v1/completions"},
                         Completion("0:0", ["abc"], finish_reason="length", logprobs=[lp]), "m")["response"]["body"]
    assert cmpl["object"] == "text_completion" and cmpl["choices"][0]["text"] == "abc"
    assert cmpl["choices"][0]["logprobs"] == {"tokens": ["ab", "c"], "token_logprobs": [-0.1, -0.2],
                                              "top_logprobs": [{"ab": -0.1}, {"c": -0.2}], "text_offset": [0, 2]}
    emb = output_record({"custom_id": "x", "url": "/v1/embeddings"},
                        Completion("0:0", value=[0.5, 1.5], prompt_tokens=4), "m")["response"]["body"]
    assert emb["data"] == [{"index": 0, "object": "embedding", "embedding": [0.5, 1.5]}]
    assert emb["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


def test_a_refused_or_failed_request_is_an_error_line():
    line = {"custom_id": "x", "url": "/v1/completions"}
    refused = output_record(line, Completion("0:0", error="prompt too long", error_kind=REJECTED), "m")
    assert refused["response"] == {"status_code": 400, "request_id": refused["response"]["request_id"], "body": None}
    assert refused["error"] == {"code": "invalid_request", "message": "prompt too long"}
    failed = output_record(line, Completion("0:0", error="engine died", error_kind=FAILED), "m")
    assert failed["response"]["status_code"] == 500 and failed["error"]["code"] == "server_error"
