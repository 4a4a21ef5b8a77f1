"""Inputs in object storage: a real S3-protocol server on localhost (moto's standalone server, over HTTP), read
through s3fs by every rank. A 2-rank run over a bucket of JSONL and Parquet shards gives the output of the
same files read from local disk; no credentials, an unreachable endpoint and a missing bucket are one line."""

import io
import json
import os

import pytest

from spmd_dp.testing import make_records, spmd
from tests.helpers import S3_CREDENTIALS, S3_NO_METADATA, one_line, s3_server

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """s3://inputs/data/: two JSONL shards and a Parquet file of 5 row groups; the same files in a local folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = tmp_path_factory.mktemp("bucket") / "data"
    local.mkdir()
    records = make_records(900, words=5)
    for k in range(2):
        (local / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[k * 300:(k + 1) * 300]))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records[600:]), buf, row_group_size=60)
    (local / "part-2.parquet").write_bytes(buf.getvalue())
    with s3_server({f"inputs/data/{f.name}": f.read_bytes() for f in sorted(local.iterdir())}) as endpoint:
        yield endpoint, local, records


def args(tmp_path, path, *extra, name="out"):
    return [f"input_data_path={path}", f"output_dir={tmp_path / 'out'}", f"name={name}", "inference_engine=echo",
            "generation_options.max_tokens=3", "batch_size=32", *extra]


def test_a_bucket_of_shards_gives_the_output_of_the_same_files_on_disk(bucket, tmp_path):
    endpoint, local, records = bucket
    remote = spmd(args(tmp_path, "s3://inputs/data/", f"+storage_options.endpoint_url={endpoint}", name="s3"),
                  nproc=2, env={**S3_CREDENTIALS, **S3_NO_METADATA})
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "input: 3 files (jsonl, parquet" in remote.stderr and "s3://inputs/data/part-2.parquet" in remote.stderr
    for r in (0, 1):  # each rank read its share from the server
        assert f"input: rank {r} scans 1 of" in remote.stderr or f"input: rank {r} scans 2 of" in remote.stderr
    on_disk = spmd(args(tmp_path, local, name="disk"), nproc=2)
    assert on_disk.returncode == 0, on_disk.stderr[-3000:]
    a = (tmp_path / "out" / "s3.jsonl").read_text().replace('"s3":', '"X":')
    b = (tmp_path / "out" / "disk.jsonl").read_text().replace('"disk":', '"X":')
    assert a == b and a.count("\n") == len(records)
    assert [json.loads(line)["id"] for line in a.splitlines()] == [r["id"] for r in records]


@pytest.mark.slow
def test_no_credentials_unreachable_storage_and_a_missing_bucket_are_one_line(bucket, tmp_path, monkeypatch):
    endpoint, _, _ = bucket
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    p = spmd(args(tmp_path, "s3://inputs/data/", f"+storage_options.endpoint_url={endpoint}"), env=S3_NO_METADATA)
    assert p.returncode == 2
    line = one_line(p)
    assert line.startswith("spmd_dp: input error: s3://inputs/data/: no credentials") and \
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line, line
    p = spmd(args(tmp_path, "s3://inputs/data/*.jsonl", "+storage_options.endpoint_url=http://127.0.0.1:9"),
             env={**S3_CREDENTIALS, **S3_NO_METADATA}, timeout=120)
    assert p.returncode == 2
    line = one_line(p)
    assert "s3://inputs/data/*.jsonl: cannot reach the storage" in line and "storage_options.endpoint_url" in line
    p = spmd(args(tmp_path, "s3://no-such-bucket/data/*.jsonl", f"+storage_options.endpoint_url={endpoint}"),
             env={**S3_CREDENTIALS, **S3_NO_METADATA})
    assert p.returncode == 2
    assert "s3://no-such-bucket/data/*.jsonl does not exist" in one_line(p)
    assert not (tmp_path / "out" / "out.jsonl").exists()
