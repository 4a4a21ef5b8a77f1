"""Input scanning: validation in one pass, errors naming file and line, reading batches by offset."""

import json

import pytest

from spmd_dp.config import load_config
from spmd_dp.inputs import RecordSpec, read_batch, scan_input
from spmd_dp.errors import UsageError
from spmd_dp.prompts import PromptBuilder

SPEC = RecordSpec("id", PromptBuilder(load_config([])).check)


def test_scan_and_read_any_span(tmp_path):
    p = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "prompt": f"p{i}"}) for i in range(23)]
    lines.insert(5, "")  # blank lines are not records
    lines.insert(12, "   ")
    p.write_text("\n".join(lines) + "\n")
    idx, bad = scan_input(p, SPEC, stride=4)
    assert idx.n_records == 23 and bad == [] and len(idx.pieces[0].locator) == 6
    for start, stop in [(0, 23), (3, 9), (8, 12), (22, 23), (5, 6)]:
        assert [r["id"] for r in read_batch(idx, start, stop)] == list(range(start, stop))


@pytest.mark.parametrize("content,expected", [
    (b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n', "in.jsonl:2: malformed JSON"),
    (b'[1, 2]\n', "in.jsonl:1: a record must be a JSON object, got list"),
    (b'{"prompt": "a"}\n', "in.jsonl:1: no primary key field 'id'"),
    (b'{"id": 1, "prompt": "a"}\n\n{"id": 1, "prompt": "b"}\n', "in.jsonl:3: duplicate primary key 1 (first at line 1)"),
    (b'{"id": 1, "prompt": "a"}\n{"id": 2}\n[]\n', "in.jsonl:2: no prompt field 'prompt' (set prompt_field=<field>, or give "
                                               "a template or a 'messages' field) (and 1 more bad records)"),
    (b'{"id": 1}\n', "in.jsonl:1: no prompt field 'prompt'"),
    (b'{"id": 1, "prompt": 5}\n', "in.jsonl:1: prompt field 'prompt' must be a string, got int"),
    (b'{"id": 1, "prompt": "\xff"}\n', "in.jsonl:1: invalid UTF-8"),
    (b'\n\n', "holds no records"),
])
def test_bad_input_names_file_and_line(tmp_path, content, expected):
    p = tmp_path / "in.jsonl"
    p.write_bytes(content)
    with pytest.raises(UsageError) as e:
        scan_input(p, SPEC, stride=4)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist; set data_dir= and input_data_path="):
        scan_input(tmp_path / "nope.jsonl", SPEC, 4)


def test_skip_mode_lists_bad_records_and_reads_around_them(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n\n{"id": 1, "prompt": "dup"}\n'
                  b'{"id": 3, "prompt": "c"}\n"str"\n{"id": 4, "prompt": "\xff"}\n{"id": 5, "prompt": "e"}\n')
    idx, bad = scan_input(p, SPEC, stride=2, skip_bad=True)
    assert idx.n_records == 7
    assert [(b.position, b.line, b.key) for b in bad] == [(1, 2, None), (2, 4, 1), (4, 6, None), (5, 7, None)]
    assert "duplicate primary key 1 (first at line 1)" in bad[1].reason
    assert idx.bad == {1, 2, 4, 5}
    rows = read_batch(idx, 0, 7)
    assert [r["id"] if r else None for r in rows] == [1, None, None, 3, None, None, 5]
    assert [r["id"] if r else None for r in read_batch(idx, 3, 7)] == [3, None, None, 5]


def test_every_repeat_of_a_key_names_the_first_and_types_differ(tmp_path):
    p = tmp_path / "in.jsonl"
    rows = [{"id": 7, "prompt": "a"}, {"id": "7", "prompt": "b"}, {"id": 7, "prompt": "c"},
            {"id": 8, "prompt": "d"}, {"id": 7, "prompt": "e"}, {"id": "7", "prompt": "f"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, bad = scan_input(p, SPEC, stride=4, skip_bad=True)
    assert [(b.position, b.key) for b in bad] == [(2, 7), (4, 7), (5, "7")]
    assert [b.reason.split(";")[0] for b in bad] == ["duplicate primary key 7 (first at line 1)",
                                                   "duplicate primary key 7 (first at line 1)",
                                                   "duplicate primary key '7' (first at line 2)"]
