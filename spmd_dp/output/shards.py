"""Sharded output (output_mode=sharded): a rank's parts, and rank 0's end of the shard set.

Each rank's sink (spmd_dp/output/sink.py) writes every batch it finished as one part in `${name}.parts/`,
atomically, named `part-<start>-<stop>-r<rank>-<token>.<jsonl|parquet>` (names sort in input order; two
deliveries of one batch never share a file); only the part's metadata goes to rank 0, which journals it.
What a reader might get wrong: a part is output only once a journal line names it; any other is removed on
resume or at the end. `finish_shards` renames the folder to `${name}/` with `_manifest.json` (docs/outputs.md).
With prefix affinity (manifest "order": "prefix") a shard's name counts slots of the grouped order, its rows are
scattered in the input (ascending), and its manifest entry lists their input positions (docs/prefix-affinity.md).
"""

from __future__ import annotations

import json
import os
import secrets
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

from spmd_dp.errors import RunFailure
from spmd_dp.log import logger
from spmd_dp.output.files import atomic_write, conform, fsync_dir, json_line, parquet_bytes, schema_digest, unify

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


class ShardWriter:
    """One rank's writer of the batches it finished: a part each; returns the part's metadata for rank 0."""

    def __init__(self, parts: Path, fmt: str, rank: int, float32: Iterable[str]) -> None:
        self.parts, self.fmt, self.rank, self.float32 = parts, fmt, rank, list(float32)
        self.token = secrets.token_hex(4)

    def write(self, start: int, stop: int, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        meta: Dict[str, Any] = {"name": None, "bytes": 0, "crc32": 0, "rows": 0}  # only bad records: no part
        if not rows:
            return meta
        name = part_name(start, stop, self.rank, self.token, self.fmt)
        if self.fmt == "parquet":
            data, schema = parquet_bytes(rows, self.float32)
            meta["schema"] = schema_digest(schema)
        else:
            data = "".join(json_line(r) + "\n" for r in rows).encode()
        try:
            atomic_write(self.parts / name, [data])
        except OSError as e:
            raise RunFailure(f"rank {self.rank} cannot write its shard {self.parts / name}: {e.strerror}; "
                             f"output_dir must be writable by every rank (a shared filesystem)") from None
        meta.update(name=name, bytes=len(data), crc32=zlib.crc32(data), rows=len(rows))
        return meta


def finish_shards(journal, fmt: str) -> Tuple[int, int]:
    """Rank 0, every batch committed: the parts' folder becomes `${name}/`, with its manifest. (records, bytes)."""
    paths = journal.paths
    shards = [list(s) for s in journal.shards() if s[2] is not None]  # start, stop, part, bytes, crc32, rows, schema
    positions = {s[0]: journal.positions_of(s[0]) for s in shards}  # prefix affinity: each shard's rows' positions
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
    permuted = any(p is not None for p in positions.values())
    head = json.dumps({"spmd_dp_manifest": MANIFEST_VERSION, "format": fmt, "records": records, "bytes": size,
                       **({"order": "prefix"} if permuted else {})})
    lines = ",\n".join(json.dumps({"path": s[2], "start": s[0], "stop": s[1], "records": s[5], "bytes": s[3],
                                   "crc32": s[4], **({"positions": positions[s[0]]} if permuted else {})})
                        for s in shards)  # one JSON object; a shard a line
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
