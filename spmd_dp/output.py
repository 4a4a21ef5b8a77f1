"""The output: the shape of an output row, atomic writes, and the final file assembled in input order.

A row is the input record plus the generated text under `${name}` (a list when
`generation_options.n` > 1) and, with `return_metadata=true`, `${name}_metadata`.
`assemble` writes `${name}.jsonl` (or `.parquet`) from the committed parts in
input order, atomically, and removes the parts; `write_errors` writes
`${name}.errors.jsonl`. What is committed, and where, is the journal's business
(spmd_dp/journal.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from spmd_dp.errors import RunFailure
from spmd_dp.log import logger


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: Iterable[bytes]) -> int:
    """Write chunks (bytes) to path via a temp file, fsync, rename. Returns the bytes written."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            n += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return n


def output_row(record: Dict[str, Any], name: str, texts: List[str], metadata: Optional[Dict[str, Any]]) -> str:
    """One output line: the record, its text under `name` (a list when n > 1), its metadata when asked."""
    out = dict(record)
    out[name] = texts[0] if len(texts) == 1 else texts
    if metadata is not None:
        out[f"{name}_metadata"] = metadata
    return json.dumps(out, ensure_ascii=False)


def assemble(journal, n_records: int) -> int:
    """Write the final output in input order (atomically) from the journal's parts; returns its size in bytes."""
    paths = journal.paths
    missing = journal.missing(n_records)
    if missing:
        raise RuntimeError(f"cannot assemble {paths.final}: records {missing[:3]} are not committed")
    lines = 0

    def chunks():
        nonlocal lines
        for _, _, part, offset, length in journal.committed():
            with open(paths.parts / part, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            lines += data.count(b"\n")
            yield data

    if paths.final.suffix == ".parquet":
        jsonl = paths.parts / "final.jsonl"
        atomic_write(jsonl, chunks())
        size = jsonl_to_parquet(jsonl, paths.final)
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


def jsonl_to_parquet(src: Path, dst: Path, rows_per_group: int = 8192) -> int:
    """Convert JSONL to Parquet (pyarrow), streaming: one pass to unify the schema, one to write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def groups():
        rows = []
        with open(src, "rb") as f:
            for line in f:
                rows.append(json.loads(line))
                if len(rows) == rows_per_group:
                    yield rows
                    rows = []
        if rows:
            yield rows

    try:
        # pa.array infers one struct type from every row's keys (Table.from_pylist would only look at the first)
        schema = pa.unify_schemas([pa.schema(list(pa.array(g).type)) for g in groups()],
                                  promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RunFailure(f"cannot write Parquet: the records' fields change type ({e}); use output_format=jsonl "
                         f"(the results are committed: rerun with output_format=jsonl)") from None
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with pq.ParquetWriter(tmp, schema) as writer:
        for g in groups():
            writer.write_table(pa.Table.from_pylist(g, schema=schema))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return dst.stat().st_size
