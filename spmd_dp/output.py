"""The output: the shape of an output row, atomic writes, and the final file assembled in input order.

A row is the input record plus the result under `${name}`: the generated text (a list
when `generation_options.n` > 1), or for pooling tasks the embedding / class
probabilities (float32 lists) or the score / reward (a float). Beside it, when asked:
`${name}_token_ids` (output token ids), `${name}_logprobs` and `${name}_prompt_logprobs`
(column-wise: the chosen token's logprob and the top-k ids and logprobs per position;
lists in JSONL, list columns of float32 in Parquet), `${name}_metadata`. With
`input_format=openai_batch` a row is the OpenAI output line instead (spmd_dp/openai_batch.py).
`assemble` writes `${name}.jsonl` (or `.parquet`) from the committed parts in
input order, atomically, and removes the parts; `write_errors` writes
`${name}.errors.jsonl`. What is committed, and where, is the journal's business
(spmd_dp/journal.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from spmd_dp.engines.base import Completion, Logprobs
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


def output_row(record: Dict[str, Any], name: str, c: Completion, metadata: Optional[Dict[str, Any]],
               token_ids: bool = False) -> str:
    """One output line: the record, its result under `name` (a list when n > 1), token ids and logprobs
    when asked (`token_ids`: return_token_ids), its metadata when asked."""
    out = dict(record)

    def one_or_all(items: List[Any]) -> Any:
        return items[0] if len(items) == 1 else items

    out[name] = c.value if c.value is not None else one_or_all(c.texts)
    if c.token_ids is not None and (token_ids or c.logprobs is not None):
        out[f"{name}_token_ids"] = one_or_all(c.token_ids)
    if c.logprobs is not None:
        out[f"{name}_logprobs"] = one_or_all([_columns(lp) for lp in c.logprobs])
    if c.prompt_logprobs is not None:
        out[f"{name}_prompt_logprobs"] = {"token_ids": c.prompt_logprobs.token_ids, **_columns(c.prompt_logprobs)}
    if metadata is not None:
        out[f"{name}_metadata"] = metadata
    return json.dumps(out, ensure_ascii=False)


def _columns(lp: Logprobs) -> Dict[str, Any]:
    return {"logprobs": lp.logprobs, "top_ids": lp.top_ids, "top_logprobs": lp.top_logprobs}


def float32_columns(name: str) -> List[str]:
    """The output's columns of floats spmd_dp writes (vectors, scores, logprobs): float32 in Parquet."""
    return [name, f"{name}_logprobs", f"{name}_prompt_logprobs"]


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


def parquet_bytes(lines: List[str], float32: Iterable[str] = ()):
    """One batch's output lines as a Parquet file in memory: (its bytes, its schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in lines]
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


def merge_parquet(parts: List[Path], dst: Path):
    """Parquet shards (in input order) as one Parquet file, atomically: (its size, its rows)."""
    import pyarrow.parquet as pq

    schema = rows_schema_of_files(parts)
    rows = 0
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with pq.ParquetWriter(tmp, schema) as writer:
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
