"""From a record to what the engine is asked: a text prompt, token ids, or a chat conversation.

In order of precedence, per record:
  - a `messages` field (list of {role, content}): a chat conversation, rendered with
    the model's chat template (vLLM's chat path);
  - a template, `prompt_template` or `${prompts_dir}/${name}.jinja|.txt`, rendered with
    the record's fields in a Jinja2 sandbox with strict undefined (a missing field is
    an error naming the record);
  - the `prompt_field` (default `prompt`): text, or a list of token ids.
With `chat=true` a text prompt becomes a one-turn conversation (after `system_prompt`).
Images (spmd_dp/prompting/images.py): a chat's `image_url` parts, and the record's `image_field`, whose images join
the last user turn of a chat (before its text) or, for a text prompt, go with it as vLLM's multi_modal_data (the
text then holds the model's own image placeholders). The scan checks them cheaply; `request` reads them.
With `task=score` the prompt is a `Pair`: the text above and the record's `document_field`.
A record may carry its own options (`generation_options`, ...: spmd_dp/prompting/options.py); with
`input_format=openai_batch` a record is an OpenAI request line, mapped first (spmd_dp/prompting/openai_batch.py).
`PromptBuilder.check` validates a record (used by the input scan, before any model
loads); `PromptBuilder.request` makes the engine request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from spmd_dp.prompting import openai_batch
from spmd_dp.config import RunConfig
from spmd_dp.config.paths import local_path, looked_in
from spmd_dp.engines.base import Chat, Pair, Request
from spmd_dp.errors import UsageError
from spmd_dp.prompting.images import PART_TYPES, ImageError, Images, field_references, image_limit, part_reference
from spmd_dp.prompting.options import RequestOptions

Messages = List[Dict[str, Any]]
Prompt = Union[str, List[int], "Chat", "Pair"]


def find_template(cfg: RunConfig) -> Optional[Path]:
    """prompt_template (relative: from prompts_dir if given, else the working directory), else
    ${prompts_dir}/${name}.jinja|.txt if there is one."""
    if cfg.prompts_dir and not local_path(cfg.prompts_dir).is_dir():
        raise UsageError(f"config error: prompts_dir={cfg.prompts_dir!r}: {local_path(cfg.prompts_dir)} is not a "
                         f"folder ({looked_in()}); give the folder of the templates")
    if cfg.prompt_template:
        path = local_path(cfg.prompt_template, cfg.prompts_dir)
        if not path.is_file():
            raise UsageError(f"config error: prompt_template={cfg.prompt_template!r}: {path} does not exist "
                             f"({looked_in('prompts_dir', cfg.prompts_dir)}); give a template file that exists")
        return path
    if cfg.prompts_dir:
        for suffix in (".jinja", ".txt"):
            path = local_path(f"{cfg.name}{suffix}", cfg.prompts_dir)
            if path.is_file():
                return path
    return None


class PromptBuilder:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.openai = cfg.input_format == "openai_batch"
        self.options = RequestOptions(cfg)
        self.images = Images(cfg.data_dir, cfg.storage_options or None, image_limit(cfg))
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
        try:
            record = self.view(record)
        except PromptError as e:
            return str(e)
        why = self.options.check(record)
        if why is not None:
            return why
        try:
            refs = self.image_references(record, self.build(record))
        except PromptError as e:
            return str(e)
        return self.images.check(refs) if refs else None

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
        """The engine request of a checked record (`base`: the rank's SamplingParams keyword arguments). Its images
        are read here, on the rank that generates it; one that cannot be read raises PromptError."""
        record = self.view(record)
        prompt = self.build(record)
        images = []
        try:
            if isinstance(prompt, Chat):
                prompt = self._with_images(prompt, record)
            elif self.cfg.image_field and record.get(self.cfg.image_field) is not None:
                images = [self.images.load(ref) for ref in field_references(record[self.cfg.image_field])]
        except ImageError as e:
            raise PromptError(f"image: {e}") from None
        request = self.options.request(request_id, record, prompt, base)
        request.images = images
        return request

    def image_references(self, record: Dict[str, Any], prompt: Prompt) -> List[Any]:
        """The record's image references: its chat's image parts, then its image field's (not read)."""
        refs = []
        if isinstance(prompt, Chat):
            refs = [part_reference(p) for m in prompt.messages if isinstance(m["content"], list) for p in m["content"]
                    if p.get("type") in PART_TYPES]
        field = self.cfg.image_field
        if field:
            if field not in record and record.get(self.cfg.messages_field) is None:  # a chat may hold its own
                raise PromptError(f"no image field '{field}' (set image_field=<field>; a record without images holds "
                                  f"null or [] there)")
            value = record.get(field)
            if value is not None:
                refs += field_references(value)
            if refs and isinstance(prompt, Pair):
                raise PromptError("task=score takes two texts, not images; remove the images or image_field")
        return refs

    def _with_images(self, chat: Chat, record: Dict[str, Any]) -> Chat:
        """The chat with its image parts read, and the image field's images before the last user turn's text."""
        messages = []
        for m in chat.messages:
            if isinstance(m["content"], list):
                m = {**m, "content": [self.images.part(part_reference(p)) if p.get("type") in PART_TYPES else p
                                      for p in m["content"]]}
            messages.append(m)
        value = record.get(self.cfg.image_field) if self.cfg.image_field else None
        if value is not None:
            extra = [self.images.part(ref) for ref in field_references(value)]
            last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
            content = messages[last]["content"]
            text = [{"type": "text", "text": content}] if isinstance(content, str) else content
            messages[last] = {**messages[last], "content": extra + text}
        return Chat(messages)

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
            if part.get("type") in PART_TYPES:
                if part_reference(part) is None:
                    raise PromptError(f"'{field}'[{i}].content[{j}]: an image part holds its image as "
                                      f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}} (a data: URL, a "
                                      f"URL or a path)")
                continue
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise PromptError(f"'{field}'[{i}].content[{j}] must be a text part {{\"type\": \"text\", "
                                  f"\"text\": ...}} or an image part {{\"type\": \"image_url\", \"image_url\": "
                                  f"{{\"url\": ...}}}}, got type {part.get('type')!r}")
    return messages
