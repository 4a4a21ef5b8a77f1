"""The end of a node as one file (spmd_dp/output/final.py): `${name}.jsonl` or `.parquet` assembled from what the
journal committed, in input order whatever order the batches came in, float columns as float32 in Parquet, never
from an incomplete journal; with output_mode=sharded merge=true from the ranks' shards; the errors file in input
order. Real journals and files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spmd_dp.config import load_config
from spmd_dp.control.messages import BatchDone
from spmd_dp.output.final import assemble, write_errors
from spmd_dp.output.sink import Output

FP = {"input_sha256": "abc", "n_records": 9}


def rows(start, stop):
    return [{"id": i, "res": [i * 0.1, 1 / 3], "note": None if i % 2 else "even"} for i in range(start, stop)]


def opened(tmp_path, *overrides):
    out = Output(load_config([f"output_dir={tmp_path}", "name=res", *overrides]))
    j = out.journal(FP)
    j.open(overwrite=False)
    return out, j


def single(start, stop):
    return BatchDone(start // 3, start, stop, 0, [json.dumps(r) for r in rows(start, stop)])


def test_parquet_from_committed_batches_in_input_order_with_float32(tmp_path):
    out, j = opened(tmp_path, "output_format=parquet")
    j.commit([single(6, 9), single(0, 3)])
    with pytest.raises(RuntimeError, match=r"cannot assemble .*res.parquet: records \[\(3, 6\)\] are not committed"):
        assemble(j, 9, out.float32)
    assert not out.paths.final.exists()  # nothing half-written
    j.commit([single(3, 6)])
    size = assemble(j, 9, out.float32)
    table = pq.read_table(out.paths.final)
    assert size == out.paths.final.stat().st_size and table.num_rows == 9
    assert table.schema.field("res").type == pa.list_(pa.float32())  # the result's floats: float32
    assert [r["id"] for r in table.to_pylist()] == list(range(9))
    assert table.column("note").to_pylist() == [r["note"] for r in rows(0, 9)]
    assert not out.paths.parts.exists() and j.complete


def test_merge_true_joins_the_ranks_shards_into_one_file(tmp_path):
    for fmt in ("jsonl", "parquet"):
        out, j = opened(tmp_path / fmt, "output_mode=sharded", "merge=true", f"output_format={fmt}")
        assert out.sharded and out.path == out.paths.final  # one file at the end
        messages = []
        for rank, (start, stop) in enumerate([(3, 6), (0, 3), (6, 9)]):
            sink = out.sink(rank, messages.append)
            sink.put(BatchDone(start // 3, start, stop, rank, []), rows(start, stop))
            sink.close()
        j.commit(messages)
        out.finish(j, 9)
        if fmt == "jsonl":
            got = [json.loads(x) for x in out.paths.final.read_text().splitlines()]
        else:
            got = pq.read_table(out.paths.final).to_pylist()
            got = [{**r, "res": [round(x, 6) for x in r["res"]]} for r in got]
        want = [{**r, "res": [round(x, 6) for x in r["res"]]} if fmt == "parquet" else r for r in rows(0, 9)]
        assert got == want, fmt  # every record once, in input order
        assert not out.paths.parts.exists()


def test_the_errors_file_is_in_input_order(tmp_path):
    errors = [{"position": 7, "key": "g", "error": "rejected by the engine: too long"},
              {"position": 2, "key": "c", "error": "skipped: malformed JSON"}]
    assert write_errors(tmp_path / "res.errors.jsonl", errors) == 2
    lines = [json.loads(x) for x in (tmp_path / "res.errors.jsonl").read_text().splitlines()]
    assert [e["position"] for e in lines] == [2, 7] and lines[0]["key"] == "c"
