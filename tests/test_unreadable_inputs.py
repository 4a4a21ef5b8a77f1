"""Input files that cannot be read through, as a new user brings them: each is one line naming the file, where it
broke and the fix, exit 2, before any engine starts; on_bad_record=skip cannot skip a file and the line says so.
(A missing bucket: tests/test_s3.py.)"""

import bz2
import gzip
import json
import os

import pytest

from spmd_dp.testing import echo_args, make_records, spmd
from tests.helpers import one_line

RECORDS = make_records(3000, words=12)
LINES = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
SKIP_HINT = "(on_bad_record=skip skips bad records, not unreadable files)"


def truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


def flipped(data: bytes) -> bytes:
    b = bytearray(data)
    for k in range(len(b) // 2, len(b) // 2 + 8):
        b[k] ^= 0xFF
    return bytes(b)


def write_case(d, case):
    """The input of a case: (input_data_path, what the line must say)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if case == "truncated .jsonl.gz":
        (d / "in.jsonl.gz").write_bytes(truncated(gzip.compress(LINES)))
        return "in.jsonl.gz", ["in.jsonl.gz: cannot read it past line", "EOFError: Compressed file ended before",
                               "the file is truncated or corrupt", SKIP_HINT]
    if case == "corrupt .jsonl.gz":
        (d / "in.jsonl.gz").write_bytes(flipped(gzip.compress(LINES)))
        return "in.jsonl.gz", ["in.jsonl.gz: cannot read it past line", "the file is truncated or corrupt"]
    if case == "not gzip":
        (d / "in.jsonl.gz").write_bytes(LINES)
        return "in.jsonl.gz", ["in.jsonl.gz: cannot read it past line 0: BadGzipFile: Not a gzipped file"]
    if case == "truncated .jsonl.bz2":
        (d / "in.jsonl.bz2").write_bytes(truncated(bz2.compress(LINES)))
        return "in.jsonl.bz2", ["in.jsonl.bz2: cannot read it", "EOFError", "truncated or corrupt"]
    if case == "truncated .jsonl.zst":
        import zstandard

        (d / "in.jsonl.zst").write_bytes(truncated(zstandard.ZstdCompressor().compress(LINES)))
        return "in.jsonl.zst", ["in.jsonl.zst: cannot read it past line", "EOFError", "truncated or corrupt",
                                SKIP_HINT]
    if case == "truncated JSONL":
        (d / "in.jsonl").write_bytes(LINES[:len(LINES) // 2 + 7])
        return "in.jsonl", ["in.jsonl:", "malformed JSON", "the file ends in the middle of this line"]
    table = pa.Table.from_pylist(RECORDS)
    if case in ("corrupt Parquet", "truncated Parquet"):
        pq.write_table(table, d / "in.parquet", row_group_size=500)
        data = (d / "in.parquet").read_bytes()
        if case == "truncated Parquet":
            (d / "in.parquet").write_bytes(truncated(data))
            return "in.parquet", ["in.parquet is not a readable Parquet file", "magic bytes", SKIP_HINT]
        b = bytearray(data)
        for k in range(600, 1400):  # inside the first row group's pages
            b[k] ^= 0x5A
        (d / "in.parquet").write_bytes(bytes(b))
        return "in.parquet", ["in.parquet is not a readable Parquet file in row group 0 (of 6)", SKIP_HINT]
    if case == "missing column":
        pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), d / "in.parquet")
        return "in.parquet", ["in.parquet has no column 'prompt' for the prompt (columns: id, text); set prompt_field="]
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(d / "hf"), max_shard_size="80KB")
    shards = sorted(p for p in os.listdir(d / "hf") if p.endswith(".arrow"))
    assert len(shards) >= 3
    if case == "dataset missing a data file":
        os.remove(d / "hf" / shards[1])
        return "hf", [f"hf/{shards[1]} is listed in", "state.json but does not exist; save the dataset again"]
    data = (d / "hf" / shards[1]).read_bytes()
    (d / "hf" / shards[1]).write_bytes(truncated(data))
    return "hf", [f"hf/{shards[1]} is not a readable Arrow file in record batch", SKIP_HINT]


CASES = ["truncated .jsonl.gz", "corrupt .jsonl.gz", "not gzip", "truncated .jsonl.bz2", "truncated .jsonl.zst",
         "truncated JSONL", "corrupt Parquet", "truncated Parquet", "missing column", "dataset missing a data file",
         "truncated dataset shard"]


@pytest.mark.parametrize("case", CASES)
def test_an_unreadable_input_is_one_line_naming_the_file_and_exit_2(tmp_path, case):
    d = tmp_path / "data"
    d.mkdir()
    path, says = write_case(d, case)
    p = spmd(echo_args(tmp_path, d / path, "on_bad_record=skip" if "truncated ." in case else "on_bad_record=fail"))
    assert p.returncode == 2, p.stderr[-3000:]
    line = one_line(p)
    assert line.startswith(f"spmd_dp: input error: {d}/"), line
    for part in says:
        assert part in line, (part, line)


@pytest.mark.slow
def test_a_truncated_gz_shard_under_two_ranks_names_the_file_on_every_rank(tmp_path):
    """The issue's case: a folder of .jsonl.gz shards, one cut short; it was 'the input scan failed on rank 1:
    EOFError' with no file named, exit 1."""
    d = tmp_path / "data"
    d.mkdir()
    for k in range(3):
        data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS[k * 1000:(k + 1) * 1000]))
        (d / f"part-{k}.jsonl.gz").write_bytes(truncated(data) if k == 2 else data)
    args = [a for a in echo_args(tmp_path, d / "x", "engine_options.echo_start_s=600") if
            not a.startswith("input_data_path=")]
    p = spmd([*args, "input_data_path=part-*.jsonl.gz"], nproc=2, timeout=180)
    assert p.returncode == 1 and p.stderr.count("exitcode  : 2") == 2, p.stderr[-3000:]  # torchrun's: each rank 2
    line = one_line(p)
    assert line.startswith(f"spmd_dp: input error: {d}/part-2.jsonl.gz: cannot read it past line "), line
    assert "EOFError" in line and "the file is truncated or corrupt" in line and SKIP_HINT in line
