"""Structured outputs (vLLM's StructuredOutputsParams): is a JSON schema, regex, choice list or grammar one
that vLLM can compile? Checked during the input scan, before any model loads.

vLLM's default backend (`auto`) compiles a constraint with xgrammar and, when xgrammar refuses it, falls back
to llguidance (vllm/sampling_params.py, `_validate_structured_outputs`). This does the same, with the same
libraries (installed with vLLM; imported only when a run has structured outputs), without a tokenizer:
what both refuse is refused here with their reasons. Results are cached per constraint, so a million records
sharing one schema compile it once.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Dict, Optional

from spmd_dp.config import structured_outputs_problem


def problem(spec: Dict[str, Any]) -> Optional[str]:
    """Why vLLM could not use `spec` (a StructuredOutputsParams object), or None."""
    why = structured_outputs_problem(spec)
    if why is not None:
        return why
    kind = next(k for k in ("json", "regex", "choice", "grammar", "json_object") if spec.get(k) is not None)
    if kind in ("choice", "json_object"):
        return None  # vLLM turns these into a grammar of its own
    value = spec[kind]
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            return f"json is not a JSON schema ({e.msg} at column {e.colno})"
    if kind == "json" and not isinstance(value, dict):
        return "json must be a JSON schema object"
    return _compile(kind, json.dumps(value, sort_keys=True) if kind == "json" else value)


@lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> Optional[str]:
    try:
        import xgrammar as xgr
    except ImportError:  # no vLLM here (an echo run): vLLM itself checks it when it runs
        return None
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(text)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif _is_lark(text):
            xgr.Grammar.from_lark(text)
        else:
            xgr.Grammar.from_ebnf(text)
        return None
    except Exception as e:  # xgrammar raises RuntimeError/ValueError with the reason
        xgrammar_error = _first_line(e)
    fallback = _guidance(kind, text)
    if fallback is None:
        return None
    return f"{kind} does not compile: {xgrammar_error} (xgrammar); {fallback} (llguidance)"


def _guidance(kind: str, text: str) -> Optional[str]:
    """llguidance's verdict (vLLM's fallback backend), or None if it accepts the constraint."""
    try:
        import llguidance
    except ImportError:
        return "not installed"
    try:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": True})
        else:
            grammar = llguidance.grammar_from("regex" if kind == "regex" else "grammar", text)
        error = llguidance.LLMatcher.validate_grammar(grammar, None)
    except Exception as e:
        return _first_line(e)
    return _first_line(error) if error else None


def _is_lark(text: str) -> bool:
    """vLLM's test (vllm/v1/structured_output/utils.py, grammar_is_likely_lark): EBNF rules use '::='."""
    return "::=" not in text


def _first_line(e: Any) -> str:
    """One line: without xgrammar's '[time] file.cc:line: ' prefix, whitespace folded, at most 200 characters."""
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip())
    return " ".join(text.split())[:200] or type(e).__name__
