"""What a record is (spmd_dp/inputs/records.py): a JSON object with a primary key of string or integer type that the
prompt builder accepts; a bad one named by file and line (or row); a line's JSON errors naming the byte or column;
keys compared by type and value (7 and "7" differ)."""

import math

import pytest

from spmd_dp.inputs.records import BadRecord, RecordSpec, decode_key, encode_key, key_hash, parse_line

SPEC = RecordSpec("id", lambda r: None if "prompt" in r else "no prompt field 'prompt'")


@pytest.mark.parametrize("record,why", [
    ({"id": 1, "prompt": "a"}, None),
    ({"id": "k", "prompt": "a"}, None),
    ([1, 2], "a record must be a JSON object, got list"),
    ({"prompt": "a"}, "no primary key field 'id' (set primary_key=<field>)"),
    ({"id": None, "prompt": "a"}, "no primary key field 'id' (set primary_key=<field>)"),
    ({"id": True, "prompt": "a"}, "primary key 'id' must be a string or an integer, got bool"),
    ({"id": 1.5, "prompt": "a"}, "primary key 'id' must be a string or an integer, got float"),
    ({"id": 1}, "no prompt field 'prompt'"),  # the prompt builder's verdict, last
])
def test_what_makes_a_record_valid(record, why):
    assert SPEC.check(record) == why


def test_a_bad_record_is_named_by_file_and_line_or_row():
    line = BadRecord(7, 9, "k", "malformed JSON", "/d/in.jsonl")
    row = BadRecord(7, 0, None, "no prompt", "/d/t.parquet", row=True)
    assert line.where == "/d/in.jsonl:9" and row.where == "/d/t.parquet: row 0"
    assert line.to_json() == {"file": "/d/in.jsonl", "line": 9, "position": 7, "key": "k", "error": "malformed JSON"}
    assert row.to_json()["row"] == 0 and "line" not in row.to_json()
    assert BadRecord.from_json(line.to_json()) == line and BadRecord.from_json(row.to_json()) == row


def test_parse_line_says_why_a_line_is_not_json():
    assert parse_line(b'{"id": 1, "p": "\xc3\xa9"}\n') == ({"id": 1, "p": "é"}, None)
    value, err = parse_line(b'{"x": NaN}')  # msgspec refuses it, json takes it: as Python's json always did
    assert err is None and math.isnan(value["x"])
    assert parse_line(b'{"id": 1, "p": "\xff"}') == (None, "invalid UTF-8 at byte 16")
    assert parse_line(b'{"id": 1, "p": ') == (None, "malformed JSON (Expecting value at column 16)")


def test_keys_compare_by_type_and_value():
    assert encode_key(7) != encode_key("7") and encode_key("7") == encode_key("7")
    for key in (7, -3, "7", "é", "\ud800"):  # a lone surrogate (json accepts it) round-trips too
        assert decode_key(encode_key(key)) == key and type(decode_key(encode_key(key))) is type(key)
    assert key_hash(encode_key("a")) == key_hash(encode_key("a")) != key_hash(encode_key("b"))
    assert 0 <= key_hash(encode_key(10 ** 30)) < 2 ** 64
