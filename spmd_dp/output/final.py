"""The end of a node, single file: `${name}.jsonl` (or `.parquet`) assembled from the committed parts in input
order, atomically, and `${name}.errors.jsonl`. (The sharded end: spmd_dp/output/shards.py.) With prefix affinity
the parts hold batches of scattered records: their lines are put back in input order by the positions the journal
keeps for them (`in_input_order`)."""

from __future__ import annotations

import json
import mmap
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

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
    positions = [journal.positions_of(c[0]) for c in committed]  # prefix affinity: each line's input position
    permuted = any(p is not None for p in positions)

    def chunks():
        nonlocal lines
        if permuted:
            for data in in_input_order(paths.parts, committed, positions):
                lines += data.count(b"\n")
                yield data
            return
        for _, _, part, offset, length in committed:
            with open(paths.parts / part, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            lines += data.count(b"\n")
            yield data

    if any(part.endswith(".parquet") for _, _, part, _, _ in committed):
        size, lines = merge_parquet([paths.parts / part for _, _, part, _, _ in committed], paths.final,
                                    positions if permuted else None)
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


def in_input_order(parts: Path, committed: Sequence[Tuple[int, int, str, int, int]],
                   positions: Sequence[Optional[List[int]]], chunk: int = 4 << 20) -> Iterator[bytes]:
    """The committed lines, put back in input order (prefix affinity: a batch's lines are scattered in the
    input; positions[k]: those of batch k's lines, ascending). The parts are memory-mapped, each line found by its
    newline, the lines sorted by position: ~24 bytes a line on rank 0, and random reads of the parts."""
    maps: Dict[str, mmap.mmap] = {}
    where, begin, end, source = [], [], [], []
    try:
        for k, (start, _, part, offset, length) in enumerate(committed):
            pos = positions[k]
            if not length:
                continue
            if part not in maps:
                with open(parts / part, "rb") as f:
                    maps[part] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            ends = np.flatnonzero(np.frombuffer(maps[part], dtype=np.uint8, count=length, offset=offset) == 10)
            ends += offset + 1
            if pos is None or len(pos) != len(ends):
                raise RuntimeError(f"cannot put {parts / part} in input order: the journal names "
                                   f"{'no' if pos is None else len(pos)} positions for its {len(ends)} lines of "
                                   f"slots {start}..; rerun with overwrite=true")
            where.append(np.asarray(pos, dtype=np.int64))
            end.append(ends)
            begin.append(np.concatenate(([offset], ends[:-1])))
            source.append(np.full(len(ends), len(source), dtype=np.int32))
        if not where:
            return
        names = [c[2] for c in committed if c[4]]
        order = np.argsort(np.concatenate(where), kind="stable")
        begin_all, end_all, source_all = np.concatenate(begin)[order], np.concatenate(end)[order], \
            np.concatenate(source)[order]
        del where, begin, end, source, order
        buf = bytearray()
        for b, e, s in zip(begin_all.tolist(), end_all.tolist(), source_all.tolist()):
            buf += maps[names[s]][b:e]
            if len(buf) >= chunk:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)
    finally:
        for m in maps.values():
            m.close()


def write_errors(path: Path, rows: List[Dict[str, Any]]) -> int:
    """`${name}.errors.jsonl`: the bad records of the scan and those the engine refused, in input order."""
    rows = sorted(rows, key=lambda e: e["position"])
    atomic_write(path, [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows])
    return len(rows)
