"""JSON Lines (spmd_dp/inputs/jsonl.py) on real files: a piece is a byte range whose records are the lines that start
in it, so pieces cut anywhere hold every line once; blank lines are not records; a batch is read from the nearest
recorded offset, forward through a compressed file, and a file that lost records while running is one clear error."""

import gzip
import json

import pytest

from spmd_dp.inputs.duplicates import KeyList
from spmd_dp.inputs.jsonl import JsonlReader, scan_piece
from spmd_dp.inputs.records import RecordSpec, decode_key
from spmd_dp.inputs.sources import InputFile

SPEC = RecordSpec("id", lambda r: None if isinstance(r.get("prompt"), str) else "no prompt field 'prompt'")
LINES = [json.dumps({"id": i, "prompt": f"p{i}"}) for i in range(10)]
LINES[4] = ""  # blank: not a record
LINES[6] = '{"id": 6}'  # a record, but a bad one
DATA = ("\n".join(LINES) + "\n").encode()


def scan(path, start, stop, every=3):
    keys, bad = KeyList(), []
    f = InputFile(str(path), path.stat().st_size, "jsonl")
    summary = scan_piece(f, start, stop, SPEC, every, keys, bad)
    got = [decode_key(bytes(keys.blob[(keys.ends[i - 1] if i else 0):keys.ends[i]])) for i in range(len(keys))]
    return summary, got, list(keys.lines), bad


def test_pieces_cut_anywhere_hold_every_line_once(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(DATA)
    whole, keys, lines, bad = scan(path, 0, len(DATA))
    assert whole["records"] == 9 and whole["lines"] == 10 and keys == [0, 1, 2, 3, 5, 7, 8, 9]
    assert lines == [1, 2, 3, 4, 6, 8, 9, 10] and bad == [(5, 7, 6, "no prompt field 'prompt'")]
    assert list(whole["locator"]) == [0, DATA.index(b'{"id": 3'), DATA.index(b'{"id": 7')]  # records 0, 3, 6
    for cut in range(1, len(DATA)):
        a, ka, _, _ = scan(path, 0, cut)
        b, kb, _, _ = scan(path, cut, len(DATA))
        assert ka + kb == keys and a["records"] + b["records"] == 9, cut
        assert a["nbytes"] + b["nbytes"] == len(DATA)  # together the pieces are the whole file


def test_a_reader_seeks_to_the_nearest_offset(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(DATA)
    summary, *_ = scan(path, 0, len(DATA))
    reader = JsonlReader(InputFile(str(path), len(DATA), "jsonl"))
    assert [r["id"] for r in reader.read(summary["locator"], 3, 4, 3)] == [5, 6, 7]  # record 4 is line 6
    assert reader.read(summary["locator"], 3, 0, 2) == [{"id": 0, "prompt": "p0"}, {"id": 1, "prompt": "p1"}]
    reader.close()


def test_compressed_files_read_forward_and_again_from_the_start(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(DATA))
    f = InputFile(str(path), path.stat().st_size, "jsonl", "gzip")
    keys, bad = KeyList(), []
    summary = scan_piece(f, 0, 1 << 62, SPEC, 3, keys, bad)  # a compressed file is one piece
    assert summary["records"] == 9 and len(keys) == 8
    reader = JsonlReader(f)
    assert [r["id"] for r in reader.read(summary["locator"], 3, 6, 3)] == [7, 8, 9]
    assert [r["id"] for r in reader.read(summary["locator"], 3, 0, 2)] == [0, 1]  # behind: from the start again
    reader.close()


def test_a_file_that_lost_records_while_running_is_named(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(DATA)
    summary, *_ = scan(path, 0, len(DATA))
    path.write_bytes(DATA[:DATA.index(b'{"id": 8')])
    reader = JsonlReader(InputFile(str(path), len(DATA), "jsonl"))
    with pytest.raises(RuntimeError, match=r"in.jsonl changed while running: records are gone; rerun to rescan it"):
        reader.read(summary["locator"], 3, 6, 3)
