"""The OpenAI Batch API file format, in and out (`input_format=openai_batch`), as vLLM's `run-batch` reads and
writes it (vllm/entrypoints/launchers/run_batch.py).

In: one request per line, `{"custom_id", "method": "POST", "url", "body"}`, for /v1/chat/completions,
/v1/completions and /v1/embeddings. `to_record` turns a line into a record of spmd_dp's own shape (messages
or prompt, generation_options, task, lora_adapter), which the usual prompt and request path takes from there;
a body that cannot be mapped is a bad record (found by the input scan: exit 2, or the errors file with
on_bad_record=skip). `body.model` picks a LoRA adapter when it names one; otherwise the run's model serves it.

Out: one line per request, in input order: `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`, the body shaped like the API's response (choices / data, usage); a request the engine
refused or failed is a line with status_code 400 / 500, no body and an `error` {code, message}.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Dict, List, Optional

from spmd_dp.engines.base import FAILED, Completion, Logprobs

URLS = {"/v1/chat/completions": "generate", "/v1/completions": "generate", "/v1/embeddings": "embed"}
# body field -> SamplingParams field (OpenAI's names, and the vLLM extensions its server accepts)
SAMPLING = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
            "top_p": "top_p", "n": "n", "stop": "stop", "seed": "seed", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "min_tokens": "min_tokens", "ignore_eos": "ignore_eos",
            "stop_token_ids": "stop_token_ids", "skip_special_tokens": "skip_special_tokens",
            "prompt_logprobs": "prompt_logprobs", "structured_outputs": "structured_outputs"}
REFUSED = {"tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
           "function_call": "function calls", "audio": "audio output", "modalities": "other modalities",
           "prediction": "predicted outputs", "suffix": "suffix", "echo": "echo"}


class BodyError(ValueError):
    """A request line that cannot be mapped onto a request."""


def to_record(line: Dict[str, Any], messages_field: str, prompt_field: str, adapters: Dict[str, str]
              ) -> Dict[str, Any]:
    """The request line as a record of spmd_dp's shape; raises BodyError naming what is wrong and the fix."""
    if not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        raise BodyError("'custom_id' must be a non-empty string")
    if line.get("method", "POST") != "POST":
        raise BodyError(f"'method' is {line.get('method')!r}; the Batch API sends POST")
    url = line.get("url")
    if url not in URLS:
        raise BodyError(f"'url' is {url!r}; supported: {', '.join(URLS)}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise BodyError("'body' must be an object (the request body of the endpoint)")
    for k, what in REFUSED.items():
        if body.get(k) not in (None, False, [], ""):
            raise BodyError(f"body.{k}: {what} are not supported; remove it")
    if body.get("stream"):
        raise BodyError("body.stream: a batch request must not be sent in stream mode (vLLM's run-batch refuses it "
                        "too); remove it")
    record: Dict[str, Any] = {"custom_id": line["custom_id"], "task": URLS[url]}
    if isinstance(body.get("model"), str) and body["model"] in adapters:
        record["lora_adapter"] = body["model"]
    if url == "/v1/embeddings":
        record[prompt_field] = _single_input(body.get("input"), "input")
        if body.get("encoding_format", "float") != "float":
            raise BodyError(f"body.encoding_format={body['encoding_format']!r}: only 'float' is written; remove it")
        if body.get("dimensions") is not None:
            record["pooling_options"] = {"dimensions": body["dimensions"]}
        return record
    if url == "/v1/chat/completions":
        if "messages" not in body:
            raise BodyError("body.messages is missing: a chat completion needs a list of {role, content}")
        record[messages_field] = body["messages"]
    else:
        record[prompt_field] = _single_input(body.get("prompt"), "prompt")
    options = {SAMPLING[k]: v for k, v in body.items() if k in SAMPLING and v is not None}
    if "max_completion_tokens" in body and "max_tokens" in body:
        options["max_tokens"] = body["max_completion_tokens"]  # the newer name wins, as in vLLM
    logprobs = body.get("logprobs")
    if url == "/v1/chat/completions" and logprobs:  # a bool, and top_logprobs = k
        options["logprobs"] = int(body.get("top_logprobs") or 0)
    elif url == "/v1/completions" and logprobs is not None and logprobs is not False:
        options["logprobs"] = int(logprobs)
    fmt = body.get("response_format")
    if fmt is not None:
        options["structured_outputs"] = _response_format(fmt)
    if options:
        record["generation_options"] = options
    return record


def _single_input(value: Any, name: str) -> Any:
    """One prompt: text or token ids (a list holding one of them is one too)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise BodyError(f"body.{name} must be one text or one list of token ids (several inputs in one request: "
                    f"write one request line each)")


def _response_format(fmt: Any) -> Optional[Dict[str, Any]]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BodyError("body.response_format.json_schema.schema must be a JSON schema object")
        return {"json": schema}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "text":
        return None
    raise BodyError(f"body.response_format.type is {kind!r}; use json_schema, json_object or text")


# -- out ------------------------------------------------------------------------------------------------

def _id(prefix: str, custom_id: str, salt: str = "") -> str:
    return prefix + hashlib.blake2b(f"{salt}\x00{custom_id}".encode(), digest_size=12).hexdigest()


def output_record(line: Dict[str, Any], c: Completion, model: str) -> Dict[str, Any]:
    """The output line (as an object) of a request line (`line`: the input line as read) and its completion."""
    cid = line.get("custom_id")
    if c.error is not None:
        failed = c.error_kind == FAILED
        return {"id": _id("batch_req_", cid), "custom_id": cid,
                "response": {"status_code": 500 if failed else 400, "request_id": _id("req_", cid), "body": None},
                "error": {"code": "server_error" if failed else "invalid_request", "message": c.error}}
    url = line["url"]
    usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.output_tokens,
             "total_tokens": c.prompt_tokens + c.output_tokens}
    created = int(time.time())
    if url == "/v1/embeddings":
        body: Dict[str, Any] = {
            "id": _id("embd-", cid), "object": "list", "created": created, "model": model,
            "data": [{"index": 0, "object": "embedding", "embedding": c.value}],
            "usage": {"prompt_tokens": c.prompt_tokens, "total_tokens": c.prompt_tokens}}
    else:
        chat = url == "/v1/chat/completions"
        reasons = c.finish_reasons or [c.finish_reason] * len(c.texts)
        choices = []
        for i, text in enumerate(c.texts):
            lp = c.logprobs[i] if c.logprobs else None
            choice: Dict[str, Any] = {"index": i}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = _chat_logprobs(lp) if lp is not None else None
            else:
                choice["text"] = text
                choice["logprobs"] = _completion_logprobs(lp) if lp is not None else None
            choice["finish_reason"] = reasons[i]
            choices.append(choice)
        body = {"id": _id("chatcmpl-" if chat else "cmpl-", cid), "object": "chat.completion" if chat
                else "text_completion", "created": created, "model": model, "choices": choices, "usage": usage}
    return {"id": _id("batch_req_", cid), "custom_id": cid,
            "response": {"status_code": 200, "request_id": _id("req_", cid), "body": body}, "error": None}


def _tok(t: str) -> Dict[str, Any]:
    return {"token": t, "bytes": list(t.encode("utf-8"))}


def _chat_logprobs(lp: Logprobs) -> Dict[str, List[Dict[str, Any]]]:
    content = []
    for j, token in enumerate(lp.tokens or []):
        top = [{**_tok(t), "logprob": v} for t, v in zip(lp.top_tokens[j], lp.top_logprobs[j])]
        content.append({**_tok(token), "logprob": lp.logprobs[j], "top_logprobs": top})
    return {"content": content}


def _completion_logprobs(lp: Logprobs) -> Dict[str, Any]:
    tokens = lp.tokens or []
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lp.logprobs,
            "top_logprobs": [dict(zip(lp.top_tokens[j], lp.top_logprobs[j])) for j in range(len(tokens))],
            "text_offset": offsets}
