"""From a record to what the engine is asked: a text prompt, token ids, or a chat conversation.

In order of precedence, per record:
  - a `messages` field (list of {role, content}): a chat conversation, rendered with
    the model's chat template (vLLM's chat path);
  - a template, `prompt_template` or `${prompts_dir}/${name}.jinja|.txt`, rendered with
    the record's fields in a Jinja2 sandbox with strict undefined (a missing field is
    an error naming the record);
  - the `prompt_field` (default `prompt`): text, or a list of token ids.
With `chat=true` a text prompt becomes a one-turn conversation (after `system_prompt`).
With `task=score` the prompt is a `Pair`: the text above and the record's `document_field`.
A record may carry its own options (`generation_options`, ...: spmd_dp/prompting/options.py); with
`input_format=openai_batch` a record is an OpenAI request line, mapped first (spmd_dp/prompting/openai_batch.py).
`PromptBuilder.check` validates a record (used by the input scan, before any model
loads; `check_keyed` also gives what its prefix key is taken from); `PromptBuilder.request` makes the engine request.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from spmd_dp.prompting import openai_batch
from spmd_dp.config import RunConfig
from spmd_dp.engines.base import Chat, Pair, Request, text_of
from spmd_dp.errors import UsageError
from spmd_dp.prompting.options import RequestOptions

Messages = List[Dict[str, Any]]
Prompt = Union[str, List[int], "Chat", "Pair"]


def find_template(cfg: RunConfig) -> Optional[Path]:
    if cfg.prompt_template:
        path = Path(cfg.prompt_template).expanduser()
        if not path.is_absolute() and cfg.prompts_dir:
            path = Path(cfg.prompts_dir).expanduser() / path
        if not path.is_file():
            raise UsageError(f"config error: prompt_template={cfg.prompt_template!r}: {path} does not exist")
        return path
    if cfg.prompts_dir:
        for suffix in (".jinja", ".txt"):
            path = Path(cfg.prompts_dir).expanduser() / f"{cfg.name}{suffix}"
            if path.is_file():
                return path
    return None


class PromptBuilder:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.openai = cfg.input_format == "openai_batch"
        self.options = RequestOptions(cfg)
        self._plain_key = cfg.prefix_field is None and not self.options.read_task and not self.options.adapters
        self.template_path = None if self.openai else find_template(cfg)
        self.template: Optional[jinja2.Template] = None
        if self.template_path is not None:
            env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                                       autoescape=False)
            try:
                self.template = env.from_string(self.template_path.read_text())
            except jinja2.TemplateSyntaxError as e:
                raise UsageError(f"config error: template {self.template_path}:{e.lineno}: {e.message}") from None

    def describe(self) -> str:
        if self.openai:
            return "OpenAI batch request lines"
        if self.template_path is not None:
            return f"template {self.template_path}" + (" as chat" if self.cfg.chat else "")
        return f"field '{self.cfg.prompt_field}'" + (" as chat" if self.cfg.chat else "")

    def check(self, record: Dict[str, Any]) -> Optional[str]:
        """Why the record cannot be prompted, or None. Runs the whole build (templates too)."""
        return self.check_keyed(record, keyed=False)[0]

    def check_keyed(self, record: Dict[str, Any], keyed: bool = True) -> Tuple[Optional[str], Optional[bytes]]:
        """`check`, and (keyed) the bytes the record's prefix key is taken from (spmd_dp/inputs/prefixes.py), from
        the same build: the value of its `prefix_field`, else its prompt as the engine gets it before the chat
        template (text; token ids; a chat's roles and texts in order; a score pair), behind the task and LoRA
        adapter that serve it when a run has several (their requests share no cache). None: no key."""
        try:
            record = self.view(record)
        except PromptError as e:
            return str(e), None
        why = self.options.check(record)
        if why is not None:
            return why, None
        try:
            prompt = self.build(record)
        except PromptError as e:
            return str(e), None
        return None, (self._key_bytes(record, prompt) if keyed else None)

    def _key_bytes(self, record: Dict[str, Any], prompt: Prompt) -> Optional[bytes]:
        if type(prompt) is str and self._plain_key:  # the common case first: the scan calls this per record
            return prompt.encode("utf-8", "surrogatepass")
        field = self.cfg.prefix_field
        if field is not None:
            value = record.get(field)
            if value is None:
                return None
            return (value if isinstance(value, str) else json.dumps(value, sort_keys=True)).encode("utf-8",
                                                                                                   "surrogatepass")
        serving = []
        if self.options.read_task:
            serving.append(self.options.task(record))
        if self.options.adapters:
            serving.append(str(record.get("lora_adapter", self.cfg.lora_adapter)))
        head = ("\x1f".join(serving) + "\x00").encode() if serving else b""
        if isinstance(prompt, list):
            return head + array("I", prompt).tobytes()
        if isinstance(prompt, Chat):
            text = "\x1e".join(f"{m['role']}\x1f{text_of(m.get('content'))}" for m in prompt.messages)
        elif isinstance(prompt, Pair):
            text = f"{prompt.query}\x1f{prompt.document}"
        else:
            text = prompt
        return head + text.encode("utf-8", "surrogatepass")

    def view(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """The record as spmd_dp's record shape (an OpenAI request line is mapped; others are themselves)."""
        if not self.openai:
            return record
        cfg = self.cfg
        try:
            return openai_batch.to_record(record, cfg.messages_field, cfg.prompt_field,
                                          cfg.engine_options.lora_adapters)
        except openai_batch.BodyError as e:
            raise PromptError(f"OpenAI request: {e}") from None

    def request(self, request_id: str, record: Dict[str, Any], base: Dict[str, Any]) -> Request:
        """The engine request of a checked record (`base`: the rank's SamplingParams keyword arguments)."""
        record = self.view(record)
        return self.options.request(request_id, record, self.build(record), base)

    def build(self, record: Dict[str, Any]) -> Prompt:
        prompt = self._build(record)
        if self.options.task(record) != "score":
            return prompt
        document = record.get(self.cfg.document_field)
        if not isinstance(prompt, str) or not isinstance(document, str):
            raise PromptError(f"task=score needs two texts: the prompt (text, got {type(prompt).__name__}) and the "
                              f"field '{self.cfg.document_field}' (text, got {type(document).__name__}); set "
                              f"document_field=<field>")
        return Pair(prompt, document)

    def _build(self, record: Dict[str, Any]) -> Prompt:
        cfg = self.cfg
        messages = record.get(cfg.messages_field)
        if messages is not None:
            return Chat(_check_messages(messages, cfg.messages_field))
        if self.template is not None:
            try:
                text = self.template.render(**record)
            except jinja2.UndefinedError as e:
                raise PromptError(f"template {self.template_path.name}: {e.message}") from None
            except jinja2.exceptions.SecurityError as e:
                raise PromptError(f"template {self.template_path.name}: unsafe operation refused ({e})") from None
            except (TypeError, ValueError, ArithmeticError) as e:
                raise PromptError(f"template {self.template_path.name}: {type(e).__name__}: {e}") from None
        else:
            if cfg.prompt_field not in record:
                raise PromptError(f"no prompt field '{cfg.prompt_field}' (set prompt_field=<field>, or give a "
                                  f"template or a '{cfg.messages_field}' field)")
            text = record[cfg.prompt_field]
            if isinstance(text, list):
                if not text or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in text):
                    raise PromptError(f"prompt field '{cfg.prompt_field}' must be text or a non-empty list of "
                                      f"token ids (integers >= 0)")
                return text
            if not isinstance(text, str):
                raise PromptError(f"prompt field '{cfg.prompt_field}' must be a string, got {type(text).__name__}")
        if cfg.chat:
            system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
            return Chat(system + [{"role": "user", "content": text}])
        return text



class PromptError(ValueError):
    """A record cannot be turned into a prompt."""


IMAGES_REFUSED = ("images in chat messages are not supported yet (vLLM 0.32's vision models need a CPU "
                  "torchvision, which the CPU build lacks: not proven here); send text parts only")


def _check_messages(messages: Any, field: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"'{field}' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise PromptError(f"'{field}'[{i}] must be an object with string 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not (isinstance(content, list) and content and all(isinstance(p, dict) for p in content)):
            raise PromptError(f"'{field}'[{i}] must be an object with string 'role' and 'content' (or a list of "
                              f"content parts)")
        for j, part in enumerate(content):
            if part.get("type") in ("image_url", "input_image", "image"):
                raise PromptError(f"'{field}'[{i}].content[{j}]: {IMAGES_REFUSED}")
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise PromptError(f"'{field}'[{i}].content[{j}] must be a text part {{\"type\": \"text\", "
                                  f"\"text\": ...}}, got type {part.get('type')!r}")
    return messages
