"""The same records in every form a user may hold them (a helper of the input tests, not a test module)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

RECORDS = [{"id": f"r{i:04d}", "prompt": f"w{i} a b c d e", "n": i} for i in range(700)]


def write_forms(d: Path, records=RECORDS) -> Path:
    """The records as: JSONL shards (beside a README), one .jsonl.gz, one .jsonl.zst, two Parquet files of
    several row groups each, a Hugging Face dataset (save_to_disk, several Arrow shards), and one JSONL file."""
    import datasets
    import zstandard

    lines = [json.dumps(r) + "\n" for r in records]
    third = len(lines) // 3 + 1
    (d / "shards").mkdir(parents=True)
    for k in range(3):
        (d / "shards" / f"part-{k}.jsonl").write_text("".join(lines[k * third:(k + 1) * third]))
    (d / "shards" / "README.md").write_text("not input")
    (d / "all.jsonl").write_text("".join(lines))
    with gzip.open(d / "all.jsonl.gz", "wt") as f:
        f.write("".join(lines))
    (d / "all.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines).encode()))
    (d / "parquet").mkdir()
    table = pa.Table.from_pylist(records)
    half = len(records) * 4 // 7
    pq.write_table(table.slice(0, half), d / "parquet" / "a.parquet", row_group_size=64)
    pq.write_table(table.slice(half), d / "parquet" / "b.parquet", row_group_size=50)
    datasets.Dataset.from_list(records).save_to_disk(str(d / "hf"), max_shard_size="8KB")
    return d
