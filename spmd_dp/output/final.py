"""The end of a node, single file: `${name}.jsonl` (or `.parquet`) assembled from the committed parts in input
order, atomically, and `${name}.errors.jsonl`. (The sharded end: spmd_dp/output/shards.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List

from spmd_dp.log import logger
from spmd_dp.output.files import atomic_write, jsonl_to_parquet, merge_parquet


def assemble(journal, n_records: int, float32: Iterable[str] = ()) -> int:
    """Write the final output in input order (atomically) from the journal's parts; returns its size in bytes.
    float32: columns whose floats are float32 in Parquet (JSONL keeps the digits written). The parts are rank 0's
    (JSONL, several batches each) or, with output_mode=sharded merge=true, the ranks' shards (JSONL or Parquet)."""
    paths = journal.paths
    missing = journal.missing(n_records)
    if missing:
        raise RuntimeError(f"cannot assemble {paths.final}: records {missing[:3]} are not committed")
    lines = 0
    committed = [c for c in journal.committed() if c[2] is not None]  # (an empty batch has no part)

    def chunks():
        nonlocal lines
        for _, _, part, offset, length in committed:
            with open(paths.parts / part, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            lines += data.count(b"\n")
            yield data

    if any(part.endswith(".parquet") for _, _, part, _, _ in committed):
        size, lines = merge_parquet([paths.parts / part for _, _, part, _, _ in committed], paths.final)
    elif paths.final.suffix == ".parquet":
        jsonl = paths.parts / "final.jsonl"
        atomic_write(jsonl, chunks())
        size = jsonl_to_parquet(jsonl, paths.final, float32=float32)
    else:
        size = atomic_write(paths.final, chunks())
    journal.mark_complete(lines, size)
    shutil.rmtree(paths.parts, ignore_errors=True)
    logger.info("wrote %s (%d records, %.1f MB)", paths.final, lines, size / 1e6)
    return size


def write_errors(path: Path, rows: List[Dict[str, Any]]) -> int:
    """`${name}.errors.jsonl`: the bad records of the scan and those the engine refused, in input order."""
    rows = sorted(rows, key=lambda e: e["position"])
    atomic_write(path, [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows])
    return len(rows)
