"""Sharded output (output_mode=sharded): every rank writes the batches it finished; rank 0 journals their metadata.

A rank's control thread (spmd_dp/control.py) hands each finished batch to its `ShardWriter` before the
batch's message leaves the rank: the batch's rows become one part in `${name}.parts/`, written
atomically (temp file, fsync, rename), named `part-<start>-<stop>-r<rank>-<token>.<jsonl|parquet>`
(start and stop: the batch's input records, zero-padded, so that names sort in input order; the
writer's rank and a token per writer, so that two ranks that ever deliver the same batch never write
one file). What goes to rank 0 is the metadata (`BatchDone.part`: name, bytes, CRC-32, rows, the
Parquet schema's digest) and the records the engine refused. Rank 0 journals it (spmd_dp/journal.py,
one fsync per round of messages): a part that no journal line names is not output; it is removed on
resume (spmd_dp/journal.py) or at the end.

At the end rank 0 (`finish_shards`) removes what the journal does not name, brings Parquet shards
to one schema (only where a batch's columns came out with another type, e.g. all null), writes
`_manifest.json` (a `_` name: pyarrow.dataset, `datasets` and the inputs of a next workflow node skip
it) and renames the folder to `${name}/`: one rename, whatever the number of shards. The folder is one
dataset for pyarrow.dataset, `datasets.load_dataset("json"|"parquet", data_files=...)` and pandas.
The output folder must be one that every rank sees (a shared filesystem): rank 0 leaves a marker in it,
which every rank checks before it writes (`check_shared`).
"""

from __future__ import annotations

import json
import os
import secrets
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from spmd_dp.errors import RunFailure, UsageError
from spmd_dp.log import logger
from spmd_dp.messages import BatchDone
from spmd_dp.plan import OutputPaths
from spmd_dp.output import atomic_write, conform, float32_columns, fsync_dir, parquet_bytes, schema_digest, unify

MANIFEST_VERSION = 1


def part_name(start: int, stop: int, rank: int, token: str, fmt: str) -> str:
    return f"part-{start:012d}-{stop:012d}-r{rank}-{token}.{fmt}"


def mark_shared(parts: Path) -> str:
    """Rank 0: leave a marker in the parts folder; every rank checks it sees it (a filesystem all ranks share)."""
    token = secrets.token_hex(6)
    atomic_write(parts / f".shared-{token}", [b""])
    return token


def shared_seen(parts: Path, token: str) -> bool:
    return (parts / f".shared-{token}").exists()


def check_shared(parts: Path, token: str, rank: int) -> None:
    if not shared_seen(parts, token):
        raise UsageError(f"output error: output_mode=sharded: rank {rank} does not see {parts}/.shared-{token}, which "
                         f"rank 0 wrote there: output_dir must be a folder on a filesystem every rank shares (or use "
                         f"output_mode=single: rank 0 writes everything)")


class ShardWriter:
    """One rank's writer of the batches it finished: a part each, then the metadata for rank 0."""

    def __init__(self, parts: Path, fmt: str, rank: int, float32: Iterable[str], shared_token: str) -> None:
        check_shared(parts, shared_token, rank)
        self.parts, self.fmt, self.rank, self.float32 = parts, fmt, rank, list(float32)
        self.token = secrets.token_hex(4)

    def __call__(self, b: BatchDone) -> BatchDone:
        if b.part is not None:
            return b
        meta = {"name": None, "bytes": 0, "crc32": 0, "rows": 0}  # a batch of bad records only: no part
        if b.lines:
            name = part_name(b.start, b.stop, self.rank, self.token, self.fmt)
            if self.fmt == "parquet":
                data, schema = parquet_bytes(b.lines, self.float32)
                meta["schema"] = schema_digest(schema)
            else:
                data = "".join(line + "\n" for line in b.lines).encode()
            try:
                atomic_write(self.parts / name, [data])
            except OSError as e:
                raise RunFailure(f"rank {self.rank} cannot write its shard {self.parts / name}: {e.strerror}; "
                                 f"output_dir must be writable by every rank (a shared filesystem)") from None
            meta.update(name=name, bytes=len(data), crc32=zlib.crc32(data), rows=len(b.lines))
        return replace(b, lines=[], part=meta)


def shard_writer(cfg, rank: int, shared_token: Optional[str]) -> Optional[ShardWriter]:
    """This rank's ShardWriter under output_mode=sharded, else None (rank 0 writes what it receives)."""
    if cfg.output_mode != "sharded":
        return None
    assert shared_token is not None
    return ShardWriter(OutputPaths.of(cfg).parts, cfg.output_format, rank, float32_columns(cfg.name), shared_token)


def finish_shards(journal, fmt: str) -> Tuple[int, int]:
    """Rank 0, every batch committed: the parts' folder becomes `${name}/`, with its manifest. (records, bytes)."""
    paths = journal.paths
    shards = [list(s) for s in journal.shards() if s[2] is not None]  # start, stop, part, bytes, crc32, rows, schema
    named = {s[2] for s in shards}
    present = {p.name for p in paths.parts.iterdir()}
    extra = sorted(present - named)
    for name in extra:  # a second delivery, a part whose message never reached rank 0, the marker
        (paths.parts / name).unlink()
    lost = sorted(named - present)
    if lost:
        raise RunFailure(f"{len(lost)} committed shards are missing from {paths.parts} (first: {lost[0]}): something "
                         f"else removed them; rerun with overwrite=true to generate everything again")
    if fmt == "parquet":
        _one_schema(paths.parts, shards)
    records, size = sum(s[5] for s in shards), sum(s[3] for s in shards)
    head = json.dumps({"spmd_dp_manifest": MANIFEST_VERSION, "format": fmt, "records": records, "bytes": size})
    lines = ",\n".join(json.dumps({"path": s[2], "start": s[0], "stop": s[1], "records": s[5], "bytes": s[3],
                                   "crc32": s[4]}) for s in shards)  # one JSON object; a shard a line
    atomic_write(paths.parts / paths.manifest.name, [f'{head[:-1]}, "shards": [\n{lines}\n]}}\n'.encode()])
    os.replace(paths.parts, paths.shards)
    fsync_dir(paths.dir)
    journal.mark_complete(records, size)
    logger.info("wrote %s: %d shards, %d records, %.1f MB (manifest %s)", paths.shards, len(shards), records,
                size / 1e6, paths.manifest.name)
    return records, size


def _one_schema(parts: Path, shards: List[list]) -> None:
    """Parquet shards whose schemas differ (a column all null in one batch) are rewritten in the unified one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = {}
    for s in shards:
        first.setdefault(s[6], s[2])
    if len(first) < 2:
        return
    schema = unify([pq.read_schema(parts / name) for name in first.values()])
    digest = schema_digest(schema)
    rewrite = [s for s in shards if s[6] != digest]
    for s in rewrite:
        table = conform(pq.read_table(parts / s[2]), schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        atomic_write(parts / s[2], [data])
        s[3], s[4], s[6] = len(data), zlib.crc32(data), digest
    logger.info("Parquet shards: %d schemas unified; %d shards rewritten in it", len(first), len(rewrite))
