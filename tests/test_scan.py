"""The input scan (spmd_dp/inputs/scan.py) in a world of one: validation in one pass, errors naming file and line,
every form a user holds reads the same records, pieces cut anywhere, shares contiguous and balanced, reading batches
by offset. (Shared by ranks for real: tests/test_input_forms.py.)"""

import json

import pytest

from spmd_dp.config import load_config
from spmd_dp.inputs import RecordSpec, read_batch, scan_input
from spmd_dp.errors import UsageError
from spmd_dp.prompting.prompts import PromptBuilder

SPEC = RecordSpec("id", PromptBuilder(load_config([])).check)


def test_scan_and_read_any_span(tmp_path):
    p = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "prompt": f"p{i}"}) for i in range(23)]
    lines.insert(5, "")  # blank lines are not records
    lines.insert(12, "   ")
    p.write_text("\n".join(lines) + "\n")
    idx, bad = scan_input(p, SPEC, offset_every=4)
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
        scan_input(p, SPEC, offset_every=4)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist; set data_dir= and input_data_path="):
        scan_input(tmp_path / "nope.jsonl", SPEC, 4)


def test_skip_mode_lists_bad_records_and_reads_around_them(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n\n{"id": 1, "prompt": "dup"}\n'
                  b'{"id": 3, "prompt": "c"}\n"str"\n{"id": 4, "prompt": "\xff"}\n{"id": 5, "prompt": "e"}\n')
    idx, bad = scan_input(p, SPEC, offset_every=2, skip_bad=True)
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
    _, bad = scan_input(p, SPEC, offset_every=4, skip_bad=True)
    assert [(b.position, b.key) for b in bad] == [(2, 7), (4, 7), (5, "7")]
    assert [b.reason.split(";")[0] for b in bad] == ["duplicate primary key 7 (first at line 1)",
                                                   "duplicate primary key 7 (first at line 1)",
                                                   "duplicate primary key '7' (first at line 2)"]


# -- inputs as users hold them: every form reads the same records ------------------------------------
import gzip  # noqa: E402
import shutil  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.helpers import RECORDS, write_forms  # noqa: E402
import spmd_dp.inputs.scan as scan_module  # noqa: E402

TABLE_SPEC = RecordSpec("id", PromptBuilder(load_config([])).check, ("prompt", "messages"))


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    return write_forms(tmp_path_factory.mktemp("forms"))


@pytest.mark.parametrize("loc,files", [("shards/*.jsonl", 3), ("shards", 3), ("all.jsonl.gz", 1), ("all.jsonl.zst", 1),
                                       ("parquet", 2), ("parquet/*.parquet", 2), ("hf", None),
                                       (["shards/part-0.jsonl", "parquet/b.parquet"], 2)])
def test_every_form_reads_the_same_records(forms, loc, files):
    entries = loc if isinstance(loc, list) else [loc]
    idx, bad = scan_input([forms / e for e in entries], TABLE_SPEC, offset_every=7)
    expected = RECORDS if not isinstance(loc, list) else RECORDS[:234] + RECORDS[400:]
    assert bad == [] and idx.n_records == len(expected)
    if files:
        assert len(idx.files) == files
    else:  # the Arrow files of the dataset, in its state.json order
        state = json.loads((forms / "hf" / "state.json").read_text())
        assert [f.url.rsplit("/", 1)[1] for f in idx.files] == [d["filename"] for d in state["_data_files"]]
        assert len(idx.files) > 2 and {f.kind for f in idx.files} == {"arrow"}
    n = len(expected)
    for start, stop in [(0, n), (3, 50), (n - 13, n), (230, 240), (399, 402), (63, 129)]:
        assert idx.read(start, stop) == expected[start:stop], (loc, start, stop)
    if isinstance(loc, str) and loc.startswith("parquet"):
        assert sum(len(p.locator) for p in idx.pieces) == 7 + 6  # row groups: 400/64 and 300/50


def test_pieces_cut_anywhere_give_the_same_records_lines_and_checksum(tmp_path, monkeypatch):
    """JSONL pieces are byte ranges cut anywhere (mid-line, on a newline, in blank lines): each line is in exactly
    one piece, positions and line numbers are those of the whole file, and the content checksum does not change."""
    p = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in RECORDS[:200]]
    for at in (0, 5, 6, 77, 150):
        lines.insert(at, " ")
    lines.insert(100, '{"id": "bad", "prompt": ')
    p.write_text("\n".join(lines))  # no newline at the end
    whole, bad_whole = scan_input(p, TABLE_SPEC, offset_every=5, skip_bad=True)
    assert len(whole.pieces) == 1 and whole.n_records == 201
    for size in (97, 200, 1000):
        monkeypatch.setattr(scan_module, "MIN_PIECE", size)
        cut, bad_cut = scan_input(p, TABLE_SPEC, offset_every=5, skip_bad=True)
        assert len(cut.pieces) == -(-p.stat().st_size // size)
        assert cut.n_records == 201 and cut.read(0, 201) == whole.read(0, 201)
        assert [r["id"] if r else None for r in cut.read(90, 110)] == [r["id"] if r else None for r in whole.read(90, 110)]
        assert [(b.position, b.line) for b in bad_cut] == [(b.position, b.line) for b in bad_whole] == [(96, 101)]
        assert cut.content_sha256() == whole.content_sha256()


def bad(loc, spec=TABLE_SPEC, **kw):
    with pytest.raises(UsageError) as e:
        scan_input(loc, spec, 8, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("input error: ")
    return msg


def test_bad_input_forms_each_one_line(tmp_path, forms):
    d = tmp_path
    table = pa.Table.from_pylist(RECORDS[:20])
    assert "nomatch*.jsonl matches no file; check data_dir= and input_data_path=" in bad(d / "nomatch*.jsonl")
    assert "missing.jsonl does not exist; set data_dir= and input_data_path=" in bad([forms / "all.jsonl.gz",
                                                                                     d / "missing.jsonl"])
    assert "is matched by both" in bad([forms / "shards/part-0.jsonl", forms / "shards/*.jsonl"])
    (d / "two").mkdir()
    pq.write_table(table, d / "two" / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": 5, "prompt": "x", "n": 1}]), d / "two" / "b.parquet")
    msg = bad(d / "two")
    assert f"column 'id' is string in {d}/two/a.parquet but integer in {d}/two/b.parquet" in msg
    pq.write_table(pa.Table.from_pylist([{"id": "z", "prompt": "x"}]), d / "two" / "b.parquet")
    assert f"column 'n' is in {d}/two/a.parquet but not in {d}/two/b.parquet" in bad(d / "two")
    pq.write_table(pa.Table.from_pylist([{"key": 5, "prompt": "x"}]), d / "nopk.parquet")
    assert "nopk.parquet has no column 'id' for the primary key (columns: key, prompt); set primary_key=" in \
        bad(d / "nopk.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": 5, "text": "x"}]), d / "noprompt.parquet")
    assert "noprompt.parquet has no column 'prompt' for the prompt (columns: id, text); set prompt_field=" in \
        bad(d / "noprompt.parquet")
    data = (forms / "parquet" / "a.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(data[:len(data) // 2])
    assert f"{d}/cut.parquet is not a readable Parquet file" in bad(d / "cut.parquet")
    (d / "garbled.parquet").write_bytes(data[:4] + b"\x07" * 2000 + data[2004:])
    assert f"{d}/garbled.parquet is not a readable Parquet file" in bad(d / "garbled.parquet")
    (d / "dups").mkdir()
    shutil.copy(forms / "shards" / "part-0.jsonl", d / "dups" / "a.jsonl")
    shutil.copy(forms / "shards" / "part-0.jsonl", d / "dups" / "b.jsonl")
    assert (f"{d}/dups/b.jsonl:1: duplicate primary key 'r0000' (first at {d}/dups/a.jsonl:1); primary keys must be "
            f"unique (and 233 more bad records)") in bad(d / "dups")
    pq.write_table(table, d / "dups" / "c.parquet")
    msg = bad([d / "dups" / "c.parquet", d / "dups" / "a.jsonl"])
    assert f"{d}/dups/a.jsonl:1: duplicate primary key 'r0000' (first at {d}/dups/c.parquet: row 0)" in msg
    (d / "readme").mkdir()
    (d / "readme" / "README.md").write_text("x")
    assert "is a folder with no input files" in bad(d / "readme")
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:3]),
                          "test": datasets.Dataset.from_list(RECORDS[3:5])}).save_to_disk(str(d / "dd"))
    assert "is a Hugging Face DatasetDict (splits: train, test); give one split, e.g. input_data_path=.../dd/train" \
        in bad(d / "dd")
    (d / "t.parquet.gz").write_bytes(gzip.compress(data))
    assert "a compressed parquet file cannot be read" in bad(d / "t.parquet.gz")
    assert "reading gs:// needs the gcsfs package: pip install 'spmd_dp[gcs]'" in bad("gs://some-bucket/x.jsonl")
    assert "unknown protocol nope://" in bad("nope://x/y.jsonl")
    (d / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"id": 1, "prompt": "a"}\n{"id": 2}\n'))
    assert f"{d}/bad.jsonl.gz:2: no prompt field 'prompt'" in bad(d / "bad.jsonl.gz")
    pq.write_table(pa.Table.from_pylist([{"id": 1, "prompt": "a"}, {"id": None, "prompt": "b"}]), d / "nullkey.parquet")
    assert f"{d}/nullkey.parquet: row 1: no primary key field 'id'" in bad(d / "nullkey.parquet")


def test_shares_are_contiguous_and_balanced():
    from spmd_dp.inputs.scan import Piece, assign
    from spmd_dp.inputs.sources import InputFile

    def owners(sizes, world):
        files = [InputFile(f"f{i}", s, "jsonl") for i, s in enumerate(sizes)]
        return assign([Piece(i, 0, s) for i, s in enumerate(sizes)], files, world)

    M = 1 << 20
    assert owners([M, M, M, M // 10], 4) == [0, 1, 2, 3]
    assert owners([65816, 66231], 2) == [0, 1]
    assert owners([M] * 10, 4) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # the largest share is 3 pieces, as small as it gets
    assert owners([5, M, M, M, 3 * M], 2) == [0, 0, 0, 0, 1]
    assert owners([M] * 3, 8) == [0, 1, 2] and owners([1], 8) == [0]
