"""From a record to what the engine is asked: a text prompt, token ids, or a chat conversation.

In order of precedence, per record:
  - a `messages` field (list of {role, content}): a chat conversation, rendered with
    the model's chat template (vLLM's chat path);
  - a template, `prompt_template` or `${prompts_dir}/${name}.jinja|.txt`, rendered with
    the record's fields in a Jinja2 sandbox with strict undefined (a missing field is
    an error naming the record);
  - the `prompt_field` (default `prompt`): text, or a list of token ids.
With `chat=true` a text prompt becomes a one-turn conversation (after `system_prompt`).
A record may carry its own `generation_options` object, merged over the config's.
`PromptBuilder.check` validates a record (used by the input scan, before any model
loads); `PromptBuilder.build` makes the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from spmd_dp.config import GenerationOptions, RunConfig
from spmd_dp.errors import UsageError

Messages = List[Dict[str, str]]
Prompt = Union[str, List[int], "Chat"]
RECORD_OPTIONS = "generation_options"
_SAMPLING_FIELDS = {f.name for f in fields(GenerationOptions)} - {"extra"}


@dataclass
class Chat:
    messages: Messages

    def last_user_text(self) -> str:
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


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
        self.template_path = find_template(cfg)
        self.template: Optional[jinja2.Template] = None
        if self.template_path is not None:
            env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                                       autoescape=False)
            try:
                self.template = env.from_string(self.template_path.read_text())
            except jinja2.TemplateSyntaxError as e:
                raise UsageError(f"config error: template {self.template_path}:{e.lineno}: {e.message}") from None
        self.extra_options = set(cfg.generation_options.extra)

    def describe(self) -> str:
        if self.template_path is not None:
            return f"template {self.template_path}" + (" as chat" if self.cfg.chat else "")
        return f"field '{self.cfg.prompt_field}'" + (" as chat" if self.cfg.chat else "")

    def check(self, record: Dict[str, Any]) -> Optional[str]:
        """Why the record cannot be prompted, or None. Runs the whole build (templates too)."""
        opts = record.get(RECORD_OPTIONS)
        if opts is not None:
            if not isinstance(opts, dict):
                return f"'{RECORD_OPTIONS}' must be an object, got {type(opts).__name__}"
            unknown = sorted(set(opts) - _SAMPLING_FIELDS - self.extra_options)
            if unknown:
                return f"'{RECORD_OPTIONS}' has unknown fields {unknown}; allowed: {sorted(_SAMPLING_FIELDS)}"
        try:
            self.build(record)
        except PromptError as e:
            return str(e)
        return None

    def build(self, record: Dict[str, Any]) -> Prompt:
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

    def sampling(self, base: Dict[str, Any], record: Dict[str, Any]) -> Dict[str, Any]:
        opts = record.get(RECORD_OPTIONS)
        return {**base, **opts} if opts else base


class PromptError(ValueError):
    """A record cannot be turned into a prompt."""


def _check_messages(messages: Any, field: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"'{field}' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PromptError(f"'{field}'[{i}] must be an object with string 'role' and 'content'")
    return messages
