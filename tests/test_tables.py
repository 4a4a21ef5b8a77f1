"""Parquet and Arrow inputs (spmd_dp/inputs/tables.py) through pyarrow, on real files: a Parquet piece is the row
groups that start in its byte range, an Arrow file (stream or file format) is one piece of record batches; rows are
read by decoding only their units; values become what a JSON line would hold; column types fold widths."""

import datetime
import decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spmd_dp.errors import UsageError
from spmd_dp.inputs.duplicates import KeyList
from spmd_dp.inputs.records import RecordSpec
from spmd_dp.inputs.sources import InputFile
from spmd_dp.inputs.tables import ArrowUnits, ParquetUnits, column_types, read_rows, scan_piece, to_records

SPEC = RecordSpec("id", lambda r: None if isinstance(r.get("prompt"), str) else "no prompt", ("prompt",))
ROWS = [{"id": i, "prompt": f"p{i}"} for i in range(25)]


def infile(path, kind):
    return InputFile(str(path), path.stat().st_size, kind)


def test_parquet_pieces_are_the_row_groups_in_their_byte_range(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=10)  # row groups of 10, 10, 5
    f = infile(path, "parquet")
    total, got = 0, []
    for start in range(0, f.size, 97):  # pieces cut anywhere
        keys, bad = KeyList(), []
        s = scan_piece(f, start, min(start + 97, f.size), SPEC, keys, bad)
        total += s["records"]
        got += [u for u, _ in s["locator"]]
        assert bad == [] and s["schema"] == {"id": "integer", "prompt": "string"}
    assert total == 25 and got == [0, 1, 2]  # each row group in exactly one piece
    keys, bad = KeyList(), []
    whole = scan_piece(f, 0, f.size, SPEC, keys, bad)
    assert whole["locator"] == [[0, 10], [1, 10], [2, 5]] and whole["crc"] != 0  # the footer's checksum
    assert read_rows(ParquetUnits(f), whole["locator"], 8, 14) == ROWS[8:22]  # across row groups


@pytest.mark.parametrize("file_format", [False, True])
def test_arrow_stream_and_file_formats(tmp_path, file_format):
    path = tmp_path / "t.arrow"
    table = pa.Table.from_pylist(ROWS)
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_file if file_format else pa.ipc.new_stream)(sink, table.schema)
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)
        writer.close()
    f = infile(path, "arrow")
    keys, bad = KeyList(), []
    s = scan_piece(f, 0, f.size, SPEC, keys, bad)
    assert s["records"] == 25 and [rows for _, rows in s["locator"]] == [7, 7, 7, 4] and len(keys) == 25
    assert read_rows(ArrowUnits(f), s["locator"], 5, 12) == ROWS[5:17]


def test_bad_rows_are_named_by_row_and_columns_are_checked(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 1, "prompt": "a"}, {"id": 2, "prompt": None},
                                         {"id": None, "prompt": "b"}]), path)
    keys, bad = KeyList(), []
    scan_piece(infile(path, "parquet"), 0, path.stat().st_size, SPEC, keys, bad)
    assert len(keys) == 1 and [(n, row, key) for n, row, key, _ in bad] == [(1, 1, 2), (2, 2, None)]
    with pytest.raises(UsageError, match=r"has no column 'key' for the primary key \(columns: id, prompt\)"):
        scan_piece(infile(path, "parquet"), 0, path.stat().st_size, RecordSpec("key", SPEC.prompt_check), KeyList(), [])


def test_dictionary_columns_of_an_arrow_file_are_refused(tmp_path):
    path = tmp_path / "d.arrow"
    table = pa.table({"id": [1, 2], "prompt": pa.array(["a", "b"]).dictionary_encode()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(UsageError, match="has dictionary-encoded columns, which spmd_dp cannot read by batch"):
        ArrowUnits(infile(path, "arrow"))


def test_values_become_what_a_json_line_holds():
    table = pa.table({"t": pa.array([datetime.datetime(2024, 1, 2, 3, 4, 5)]), "d": pa.array([decimal.Decimal("1.50")]),
                      "b": pa.array([b"\xff\x00"]), "s": pa.array([b"text"]), "l": pa.array([[datetime.date(2024, 5, 6)]]),
                      "x": pa.array([3])})
    assert to_records(table) == [{"t": "2024-01-02T03:04:05", "d": "1.50", "b": "/wA=", "s": "text",
                                  "l": ["2024-05-06"], "x": 3}]
    plain = pa.table({"i": pa.array([1], pa.int32()), "s": pa.array(["a"], pa.large_string()),
                      "v": pa.array([[1.5]], pa.list_(pa.float32())), "st": pa.array([{"a": 1}])})
    assert column_types(plain.schema) == {"i": "integer", "s": "string", "v": "list<float>",
                                          "st": "struct<a: integer>"}
