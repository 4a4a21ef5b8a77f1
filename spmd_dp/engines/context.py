"""What a prompt too long for the context becomes (`on_long_prompt`, `clamp_max_tokens`): the one place it is decided,
for both engines (the echo engine counts words, vLLM tokens; the messages say which)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


LONG_PROMPT_HINT = "on_long_prompt=fail: set on_long_prompt=truncate_left, truncate_right or skip"


@dataclass(frozen=True)
class Fit:
    """What a request becomes in a context of `max_model_len` tokens."""

    action: str  # "run" | "refuse" (vLLM refuses it: on_long_prompt=fail) | "skip" | "truncate"
    keep: int = 0  # truncate: prompt tokens kept
    max_tokens: Optional[int] = None  # lowered max_tokens (clamp_max_tokens), or None: unchanged
    reason: str = ""


def fit_context(prompt_tokens: int, max_tokens: int, max_model_len: Optional[int], policy: str,
                clamp: bool, generate: bool = True, unit: str = "tokens") -> Fit:
    """A prompt is too long when it leaves no room for an output token (what vLLM refuses; for pooling
    tasks, when it is longer than the context). on_long_prompt decides then: fail (vLLM refuses it),
    skip, or truncate_left / truncate_right (keep the last / first max_model_len - max_tokens tokens,
    room for the output asked). A prompt that fits but leaves fewer than max_tokens: with
    clamp_max_tokens, max_tokens is lowered to what is left (as vLLM's OpenAI server does); without,
    vLLM stops the output at the end of the context (finish_reason length); truncate_* cut the prompt instead."""
    if max_model_len is None:
        return Fit("run")
    room = max_model_len - prompt_tokens  # output tokens the context leaves
    too_long = room < 1 if generate else room < 0
    if not generate:
        max_tokens = 0
    reason = (f"the prompt ({prompt_tokens} {unit}) is longer than max_model_len={max_model_len} allows"
              + (f" (no room for an output {unit.rstrip('s')})" if generate else ""))
    if too_long or (generate and room < max_tokens and policy.startswith("truncate") and not clamp):
        if policy == "skip":
            return Fit("skip", reason=reason + "; on_long_prompt=skip")
        if policy.startswith("truncate"):
            keep = max_model_len - max_tokens if generate else max_model_len
            if keep < 1:
                return Fit("refuse", reason=f"max_tokens={max_tokens} leaves no prompt token in max_model_len="
                                            f"{max_model_len}; lower max_tokens")
            return Fit("truncate", keep=keep)
        if too_long:
            return Fit("refuse", reason=reason + f"; {LONG_PROMPT_HINT}")
    if generate and clamp and 1 <= room < max_tokens:
        return Fit("run", max_tokens=room)
    return Fit("run")
