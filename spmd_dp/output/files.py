"""Writing files safely: atomic writes (temp file, fsync, rename), and rows as Parquet (pyarrow: one schema for
rows whose fields vary, float32 where spmd_dp writes floats, shards brought to one schema)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from spmd_dp.errors import RunFailure


def json_line(row: Dict[str, Any]) -> str:
    """A row as one line of JSON (non-ASCII kept as is)."""
    return json.dumps(row, ensure_ascii=False)


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


def jsonl_to_parquet(src: Path, dst: Path, rows_per_group: int = 8192, float32: Iterable[str] = ()) -> int:
    """Convert JSONL to Parquet (pyarrow), streaming: one pass to unify the schema, one to write.
    Lists become list columns; the floats of the `float32` columns are float32 (list<float> for a vector)."""
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

    schema = rows_schema(groups(), float32)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with pq.ParquetWriter(tmp, schema) as writer:
        for g in groups():
            writer.write_table(pa.Table.from_pylist(g, schema=schema))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return dst.stat().st_size


def rows_schema(groups: Iterable[List[Dict[str, Any]]], float32: Iterable[str] = ()):
    """One Arrow schema for groups of rows (pa.array infers one struct type from every row's keys; Table.from_pylist
    would only look at the first); the floats of the `float32` columns as float32."""
    import pyarrow as pa

    try:
        schema = pa.unify_schemas([pa.schema(list(pa.array(g).type)) for g in groups], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RunFailure(f"cannot write Parquet: the records' fields change type ({e}); use output_format=jsonl "
                         f"(the results are committed: rerun with output_format=jsonl)") from None
    narrow = set(float32)
    return pa.schema([f.with_type(_float32(f.type)) if f.name in narrow else f for f in schema])


def parquet_bytes(rows: List[Dict[str, Any]], float32: Iterable[str] = ()):
    """One batch's output rows as a Parquet file in memory: (its bytes, its schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = rows_schema([rows], float32)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes(), schema


def schema_digest(schema) -> str:
    """A short digest of an Arrow schema: shards with equal digests have equal schemas."""
    return hashlib.sha256(schema.serialize().to_pybytes()).hexdigest()[:16]


def conform(table, schema):
    """A table in `schema`: its columns cast, in the schema's order, missing ones as nulls (shards of one run differ
    only where a batch's rows had nulls, or ints where another's had floats)."""
    import pyarrow as pa

    try:
        cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                for f in schema]
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise RunFailure(f"cannot bring the Parquet shards to one schema ({e}); use output_format=jsonl (the results "
                         f"are committed: rerun with output_format=jsonl merge=true to resume)") from None
    return pa.Table.from_arrays(cols, schema=schema)


def merge_parquet(parts: List[Path], dst: Path, positions: Optional[List[Optional[List[int]]]] = None):
    """Parquet shards (in input order) as one Parquet file, atomically: (its size, its rows). positions (prefix
    affinity: the shards hold scattered records): each shard's rows' input positions; the rows are sorted by them
    (in memory: the whole output once)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = rows_schema_of_files(parts)
    rows = 0
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with pq.ParquetWriter(tmp, schema) as writer:
        if positions is not None:
            tables = [conform(pq.read_table(p), schema) for p in parts]
            where = np.concatenate([np.asarray(pos if pos is not None else [], dtype=np.int64) for pos in positions])
            table = pa.concat_tables(tables)
            if len(where) != len(table):
                raise RunFailure(f"cannot put the shards in input order: {len(where)} positions for {len(table)} rows; "
                                 f"rerun with overwrite=true")
            writer.write_table(table.take(np.argsort(where, kind="stable")))
            rows = len(table)
            parts = []
        for p in parts:
            table = conform(pq.read_table(p), schema)
            rows += len(table)
            writer.write_table(table)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return dst.stat().st_size, rows


def rows_schema_of_files(parts: Iterable[Path]):
    """The unified schema of Parquet files (their footers only)."""
    import pyarrow.parquet as pq

    schemas = {}
    for p in parts:
        s = pq.read_schema(p)
        schemas.setdefault(schema_digest(s), s)
    return unify(list(schemas.values()))


def unify(schemas: List[Any]):
    import pyarrow as pa

    if len(schemas) == 1:
        return schemas[0]
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RunFailure(f"cannot bring the Parquet shards to one schema ({e}); use output_format=jsonl") from None


def _float32(t):
    """The type with its floats as float32 (inside lists and structs too)."""
    import pyarrow as pa

    if pa.types.is_floating(t):
        return pa.float32()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_float32(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_float32(f.type)) for f in t])
    return t
