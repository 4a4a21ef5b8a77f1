"""Writing files safely (spmd_dp/output/files.py), on real files: an atomic write leaves the old file or the new one,
never half of one; rows whose fields vary become one Parquet schema, spmd_dp's float columns float32; Parquet
shards of one run (a column all null in one) merge into one file; a field that changes type is one clear line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spmd_dp.errors import RunFailure
from spmd_dp.output.files import (atomic_write, conform, json_line, jsonl_to_parquet, merge_parquet, parquet_bytes,
                                  rows_schema, schema_digest)


def test_an_atomic_write_is_all_or_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"old\n")

    def chunks():
        yield b"new 1\n"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, chunks())
    assert path.read_bytes() == b"old\n"  # the old file, whole
    assert atomic_write(path, [b"a\n", b"bc\n"]) == 5 and path.read_bytes() == b"a\nbc\n"
    assert json_line({"t": "é", "n": [1]}) == '{"t": "é", "n": [1]}'  # one line, non-ASCII as it is


def test_rows_of_varying_fields_are_one_schema(tmp_path):
    rows = [{"id": 1, "out": [0.5, 0.25]}, {"id": 2, "out": None, "extra": {"a": 1}}]
    schema = rows_schema([rows[:1], rows[1:]], float32=["out"])
    assert schema.field("out").type == pa.list_(pa.float32()) and schema.field("extra").type == pa.struct([("a", pa.int64())])
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    size = jsonl_to_parquet(src, tmp_path / "out.parquet", rows_per_group=2, float32=["out"])
    table = pq.read_table(tmp_path / "out.parquet")
    assert size > 0 and table.num_rows == 6 and table.column("extra").to_pylist()[:2] == [None, {"a": 1}]
    with pytest.raises(RunFailure, match="the records' fields change type .*use output_format=jsonl"):
        rows_schema([[{"v": 1}], [{"v": "one"}]])


def test_shards_of_one_run_merge_into_one_parquet_file(tmp_path):
    first, schema1 = parquet_bytes([{"id": 1, "v": None}], ["v"])  # a batch whose column is all null
    second, schema2 = parquet_bytes([{"id": 2, "v": 1.5}], ["v"])
    assert schema_digest(schema1) != schema_digest(schema2)
    (tmp_path / "a.parquet").write_bytes(first)
    (tmp_path / "b.parquet").write_bytes(second)
    size, rows = merge_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "all.parquet")
    table = pq.read_table(tmp_path / "all.parquet")
    assert rows == 2 and size == (tmp_path / "all.parquet").stat().st_size
    assert table.to_pylist() == [{"id": 1, "v": None}, {"id": 2, "v": 1.5}] and table.schema.field("v").type == pa.float32()
    wider = pa.schema([("id", pa.int64()), ("v", pa.float32()), ("w", pa.string())])
    assert conform(pq.read_table(tmp_path / "b.parquet"), wider).to_pylist() == [{"id": 2, "v": 1.5, "w": None}]
