"""Prompt tokens as the run's engine will count them, and a rank's pass over its share of the input.

The echo engine counts words (spmd_dp/engines/echo.py); vLLM the model's tokenizer (transformers' AutoTokenizer of
the model folder, as vLLM loads it): a text prompt with the tokenizer's special tokens, a chat rendered with the
model's chat template then tokenized as is (what vLLM's chat path does), token ids as they are, a score pair as
the tokenizer pairs them. What a record becomes in the context is `fit_context`'s decision, the engines' own.

`count_share` reads every record of the rank's share and builds its request (the run's PromptBuilder: templates,
chat, the record's own options). Every record whose prompt could be too long is tokenized exactly, so the count
of records that do not fit is exact; the others are tokenized only when they fall in the uniform sample of
`preflight.token_sample` records that gives the distribution. What a reader would get wrong: "could be too
long" is decided by a bound (a token covers at least one byte of the rendered prompt, plus the tokenizer's
special tokens), so a record the bound clears fits for certain.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from spmd_dp.engines.base import Chat, Pair, Request, text_of
from spmd_dp.engines.context import fit_context
from spmd_dp.errors import UsageError

CHUNK = 4096  # records read at a time
TOKENIZE_BATCH = 512  # prompts tokenized at a time
FIRST_KEYS = 10  # records named in the report (the first in input order)
MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "max_seq_length", "seq_len")  # where a model's config says its context (the smallest, as vLLM)


class Tokens:
    """How many tokens a prompt is for the run's engine, and the context those must fit."""

    def __init__(self, cfg) -> None:
        eo = cfg.engine_options
        self.words = cfg.inference_engine == "echo"
        self.tok = None
        self.limit, self.limit_source = eo.max_model_len, "engine_options.max_model_len"
        if self.words:
            self.describe = "words (the echo engine's tokens)"
            if self.limit is None:
                self.limit_source = "none (engine_options.max_model_len is null: the echo engine has no context limit)"
            return
        from spmd_dp.models.embedded import resolve_model

        where = str(eo.vllm_kwargs.get("tokenizer") or resolve_model(cfg.model_name))
        try:
            from transformers import AutoConfig, AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(where, trust_remote_code=eo.trust_remote_code)
            if self.limit is None:
                config = AutoConfig.from_pretrained(resolve_model(cfg.model_name),
                                                    trust_remote_code=eo.trust_remote_code)
                config = getattr(config, "text_config", None) or config
                found = [int(getattr(config, k)) for k in MAX_LEN_KEYS if getattr(config, k, None)]
                self.limit = min(found) if found else None
                self.limit_source = "the model's config.json" if found else "unknown (set engine_options.max_model_len)"
        except (OSError, ValueError, ImportError) as e:
            text = " ".join(str(e).split())[:200]
            raise UsageError(f"config error: preflight cannot load the tokenizer of {where} ({type(e).__name__}: "
                             f"{text}); check model_name (or engine_options.vllm_kwargs.tokenizer)") from None
        self.describe = f"the tokenizer of {where}"
        self.specials = self.tok.num_special_tokens_to_add()

    # -- what a prompt is before it is tokenized ----------------------------------------------------------
    def rendered(self, prompt: Any) -> Any:
        """What gets tokenized: a text (str), token ids (list), or a pair (query, document)."""
        if self.words:
            return prompt
        if isinstance(prompt, Chat):
            messages = [{**m, "content": text_of(m["content"])} for m in prompt.messages]
            return ("chat", self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        if isinstance(prompt, Pair):
            return (prompt.query, prompt.document)
        return prompt

    def bound(self, rendered: Any) -> Optional[int]:
        """The exact count when it is cheap (words, token ids), else an upper bound; None: tokenize to know."""
        if self.words:
            if isinstance(rendered, Chat):
                rendered = rendered.last_user_text()
            elif isinstance(rendered, Pair):
                rendered = f"{rendered.query} {rendered.document}"
            return len(rendered.split()) if isinstance(rendered, str) else len(rendered)
        if isinstance(rendered, list):
            return len(rendered)
        if isinstance(rendered, tuple) and rendered[0] == "chat":
            return len(rendered[1].encode()) + 1
        if isinstance(rendered, tuple):
            return len(rendered[0].encode()) + len(rendered[1].encode()) + self.specials + 2
        return len(rendered.encode()) + self.specials + 1

    def exact_is_cheap(self) -> bool:
        return self.words

    def count(self, rendered: List[Any]) -> List[int]:
        """The exact tokens of each rendered prompt (the model's tokenizer, in one batch per kind)."""
        out: List[int] = [0] * len(rendered)
        texts = [(i, r) for i, r in enumerate(rendered) if isinstance(r, str)]
        chats = [(i, r[1]) for i, r in enumerate(rendered) if isinstance(r, tuple) and r[0] == "chat"]
        pairs = [(i, r) for i, r in enumerate(rendered) if isinstance(r, tuple) and r[0] != "chat"]
        for group, special in ((texts, True), (chats, False)):
            if group:
                ids = self.tok([t for _, t in group], add_special_tokens=special, return_attention_mask=False,
                               return_token_type_ids=False)["input_ids"]
                for (i, _), x in zip(group, ids):
                    out[i] = len(x)
        for i, (q, d) in pairs:
            out[i] = len(self.tok(q, d, return_attention_mask=False, return_token_type_ids=False)["input_ids"])
        for i, r in enumerate(rendered):
            if isinstance(r, list):
                out[i] = len(r)
        return out


@dataclass
class Share:
    """What a rank found in its share of the records (JSON-able but for `lengths`)."""

    records: int = 0
    bad: int = 0  # skipped bad records (on_bad_record=skip)
    tokenized: int = 0  # prompts counted exactly
    sampled: int = 0  # of them, in the uniform sample
    sample_tokens: int = 0  # their prompt tokens
    not_fitting: int = 0
    actions: Dict[str, int] = field(default_factory=dict)  # refused, skipped, truncated, clamped, cut
    budget: int = 0  # the output tokens the records that run may generate: their max_tokens, as the context leaves
    first: List[List[Any]] = field(default_factory=list)  # [position, key, prompt tokens, max_tokens, action]
    options: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    lengths: Any = None  # np.uint32 prompt tokens of the sampled records

    def to_json(self) -> Dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k != "lengths"}
        return d


def output_budget(fit, prompt_tokens: int, max_tokens: int, limit: Optional[int]) -> int:
    """The output tokens a generate request that runs may produce: max_tokens, lowered by clamp_max_tokens, or cut
    where the context ends (a truncated prompt leaves max_tokens); 0 for a refused or skipped one."""
    if fit.action in ("refuse", "skip"):
        return 0
    if fit.max_tokens is not None:
        return fit.max_tokens
    if fit.action == "run" and limit is not None:
        return max(min(max_tokens, limit - prompt_tokens), 0)
    return max_tokens


def what_happens(fit, prompt_tokens: int, max_tokens: int, limit: Optional[int], generate: bool) -> Optional[str]:
    """A record that does not fit (prompt + max_tokens > max_model_len): what the run does with it."""
    if limit is None or (prompt_tokens + (max_tokens if generate else 0)) <= limit:
        return None
    if fit.action == "refuse":
        return "refused"
    if fit.action == "skip":
        return "skipped"
    if fit.action == "truncate":
        return "truncated"
    return "clamped" if fit.max_tokens is not None else "cut"


def count_share(index, prompts, sampling: Dict[str, Any], span: Tuple[int, int], tokens: Tokens,
                every: int) -> Share:
    """Records [span) of the input: their requests, options, prompt tokens (every `every`-th record in the sample,
    and every one that could be too long exactly), and what the context does with each that does not fit."""
    t0 = time.monotonic()
    share = Share()
    options: Counter = Counter()
    lengths: List[int] = []
    pending: List[Tuple[int, Request, Any, bool]] = []  # (position, request, rendered, sampled) to tokenize
    limit = tokens.limit

    def settle(position: int, request: Request, n: int, sampled: bool) -> None:
        generate = request.task == "generate"
        max_tokens = int(request.sampling.get("max_tokens") or 16)
        if sampled:
            lengths.append(n)
            share.sample_tokens += n
        fit = fit_context(n, max_tokens, limit, request.on_long_prompt, request.clamp_max_tokens, generate)
        if generate:
            share.budget += output_budget(fit, n, max_tokens, limit)
        what = what_happens(fit, n, max_tokens, limit, generate)
        if what is not None:
            share.not_fitting += 1
            share.actions[what] = share.actions.get(what, 0) + 1
            if len(share.first) < FIRST_KEYS:
                share.first.append([position, request.key, n, max_tokens, what])

    def flush() -> None:
        counts = tokens.count([r for _, _, r, _ in pending])
        for (position, request, _, sampled), n in zip(pending, counts):
            settle(position, request, n, sampled)
        share.tokenized += len(pending)
        pending.clear()

    for a in range(span[0], span[1], CHUNK):
        records = index.read(a, min(a + CHUNK, span[1]))
        for i, record in enumerate(records):
            position = a + i
            share.records += 1
            if record is None:
                share.bad += 1
                continue
            request = prompts.request(f"preflight:{position}", record, sampling)
            _note_options(options, record, request)
            sampled = position % every == 0
            rendered = tokens.rendered(request.prompt)
            bound = tokens.bound(rendered)
            max_tokens = int(request.sampling.get("max_tokens") or 16) if request.task == "generate" else 0
            if tokens.exact_is_cheap() or isinstance(request.prompt, list):
                share.tokenized += 1
                settle(position, request, bound, sampled)
            elif sampled or (limit is not None and bound + max_tokens > limit):
                pending.append((position, request, rendered, sampled))
                if len(pending) >= TOKENIZE_BATCH:
                    flush()
            else:  # it fits for certain
                share.budget += max_tokens
        if pending:
            flush()
    share.sampled = len(lengths)
    share.lengths = np.asarray(lengths, dtype=np.uint32)
    share.options = dict(options)
    share.seconds = round(time.monotonic() - t0, 3)
    return share


def _note_options(options: Counter, record: Dict[str, Any], request: Request) -> None:
    """What the records ask besides a prompt (the report's 'per-record options in use')."""
    options[f"task:{request.task}"] += 1
    if request.lora:
        options[f"lora_adapter:{request.lora}"] += 1
    if "generation_options" in record:
        options["own generation_options"] += 1
    if request.sampling.get("structured_outputs"):
        options["structured outputs"] += 1
    if request.max_retries:
        options["max_retries > 0"] += 1
    if request.sampling.get("logprobs") is not None or request.sampling.get("prompt_logprobs") is not None:
        options["logprobs"] += 1
    if isinstance(request.prompt, Chat):
        options["chat"] += 1
    elif isinstance(request.prompt, list):
        options["token ids"] += 1
