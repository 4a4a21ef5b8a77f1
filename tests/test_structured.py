"""Structured outputs checked before any model loads (spmd_dp/prompting/structured.py): what vLLM's `auto` backend
would compile (xgrammar, then llguidance) passes, what both refuse is one line with both reasons, and a constraint
shared by many records is compiled once."""

import pytest

from spmd_dp.prompting import structured
from spmd_dp.prompting.structured import problem

pytest.importorskip("xgrammar")  # installed with vLLM


@pytest.mark.parametrize("spec", [
    {"json": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
    {"json": '{"type": "array", "items": {"type": "integer"}}'},  # JSON text
    {"regex": "[0-9]{3}-[a-z]+"},
    {"choice": ["yes", "no"]},
    {"json_object": True},
    {"grammar": 'root ::= "yes" | "no"'},  # EBNF
    {"grammar": 'start: "yes" | "no"'},  # Lark (no ::=), as vLLM tells them apart
])
def test_what_vllm_compiles_passes(spec):
    assert problem(spec) is None


@pytest.mark.parametrize("spec,why", [
    ({"json": "{not json"}, "json is not a JSON schema (Expecting property name enclosed in double quotes at column 2)"),
    ({"json": "[1, 2]"}, "json must be a JSON schema object"),
    ({"regex": "[0-9"}, "regex does not compile: "),
    ({"grammar": "root ::= ("}, "grammar does not compile: "),
    ({"choice": []}, "choice must be a non-empty list of strings"),  # the shape, checked first
    ({"regex": "a", "choice": ["b"]}, "give exactly one of"),
])
def test_what_both_backends_refuse_is_one_line(spec, why):
    line = problem(spec)
    assert line is not None and why in line and "\n" not in line and len(line) < 600
    if "does not compile" in why:
        assert "(xgrammar); " in line and line.endswith("(llguidance)")  # both verdicts, vLLM's fallback's last


def test_a_schema_shared_by_many_records_compiles_once():
    structured._compile.cache_clear()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for _ in range(1000):
        assert problem({"json": dict(schema)}) is None  # equal schemas, each its own object
    info = structured._compile.cache_info()
    assert info.misses == 1 and info.hits == 999
