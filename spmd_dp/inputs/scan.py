"""The input scan, shared by every rank: each indexes a share of the input, the shares merge into one index.

  1. rank 0 lists the input files (spmd_dp/inputs/sources.py); every rank gets the list;
  2. the files are cut into pieces (byte ranges of a JSONL or Parquet file, a whole compressed
     or Arrow file) by their sizes alone, so a rerun on any number of ranks cuts them alike;
     each rank takes a contiguous share of the pieces, balanced by bytes, and validates its
     records (spmd_dp/inputs/jsonl.py, tables.py) while its engine starts, in processes forked
     for it before (scanners.py: no turns on the GIL with the engine's start);
  3. the pieces' summaries (record counts, locators, checksums, schemas) are all-gathered:
     every rank builds the same index (spmd_dp/inputs/index.py), and checks that the
     tables' schemas agree;
  3b. with prefix affinity, the order records are generated in, from their prefix keys (order.py);
  4. the duplicate-key check, partitioned by key hash over the ranks (duplicates.py);
  5. bad records: with on_bad_record=fail every rank raises the same one line (the first
     bad record in input order, and how many more); with skip, every rank learns their
     positions and rank 0 their details (the errors file).
Every step ends in a collective that carries each rank's error, so all ranks fail
together, with the same line, and none waits for a peer that has given up. `scan_input` scans in a world of
one (spmd_dp/control/local.py's LocalGroup: tests, tools).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from spmd_dp.control.local import LocalGroup
from spmd_dp.errors import RunFailure, UsageError
from spmd_dp.inputs import jsonl, tables
from spmd_dp.inputs.duplicates import KeyList, find_duplicates, outgoing
from spmd_dp.inputs.index import IndexedPiece, InputIndex, locator_from_json, locator_to_json
from spmd_dp.inputs.order import RecordOrder, shared_order
from spmd_dp.inputs.prefixes import PrefixList, payload
from spmd_dp.inputs.records import BadRecord, RecordSpec, decode_key
from spmd_dp.inputs.sources import InputFile, is_read_error, locations, read_error, resolve
from spmd_dp.log import logger

MIN_PIECE, MAX_PIECE, TARGET_PIECES = 1 << 20, 64 << 20, 4096
COMPRESSED_WEIGHT = 4  # a compressed byte holds more records, and costs decompressing


@dataclass(frozen=True)
class Piece:
    file: int
    start: int  # a byte range of the file; a whole compressed or Arrow file is [0, size)
    stop: int
    whole: bool = False

    def describe(self, files: Sequence[InputFile]) -> str:
        f = files[self.file]
        return f.url if self.whole else f"{f.url} bytes {self.start}..{self.stop}"


@dataclass
class ScanResult:
    index: InputIndex
    bad: List[BadRecord] = field(default_factory=list)  # rank 0: every bad record (skip); other ranks: []
    n_bad: int = 0
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)
    order: Optional[RecordOrder] = None  # the order records are generated in (spmd_dp/inputs/order.py)


def plan_pieces(files: Sequence[InputFile]) -> List[Piece]:
    """Pieces by file sizes alone: ~TARGET_PIECES of the whole input, each 1 to 64 MiB."""
    total = sum(f.size for f in files)
    chunk = min(max(total // TARGET_PIECES, MIN_PIECE), MAX_PIECE)
    pieces = []
    for i, f in enumerate(files):
        if f.kind == "arrow" or f.compression:
            pieces.append(Piece(i, 0, f.size, whole=True))
            continue
        for start in range(0, max(f.size, 1), chunk):
            pieces.append(Piece(i, start, min(start + chunk, f.size)))
    return pieces


def assign(pieces: Sequence[Piece], files: Sequence[InputFile], world: int) -> List[int]:
    """The rank of each piece: contiguous shares in input order with the smallest largest share (bytes;
    compressed bytes weigh more): the least capacity that `world` ranks filled in order can hold, by bisection."""
    weights = [(p.stop - p.start) * (COMPRESSED_WEIGHT if files[p.file].compression else 1) + 1 for p in pieces]

    def fill(capacity: int) -> List[int]:
        owners, rank, load = [], 0, 0
        for w in weights:
            if load and load + w > capacity:
                rank, load = rank + 1, 0
            owners.append(rank)
            load += w
        return owners

    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid)[-1] < world:
            hi = mid
        else:
            lo = mid + 1
    return fill(lo)


def _scan_piece(piece: Piece, f: InputFile, spec: RecordSpec, offset_every: int, keys: KeyList, bad: list,
                storage_options) -> Tuple[Dict[str, Any], Optional[PrefixList]]:
    """The piece's summary, and its records' prefix keys (None: none are taken, prefix_affinity=false)."""
    prefixes = PrefixList(spec.whole_key) if spec.prompt_key is not None else None
    try:
        if f.kind == "jsonl":
            stop = (1 << 62) if piece.whole else piece.stop
            return (jsonl.scan_piece(f, piece.start, stop, spec, offset_every, keys, bad, storage_options, prefixes),
                    prefixes)
        return tables.scan_piece(f, piece.start, piece.stop, spec, keys, bad, storage_options, prefixes), prefixes
    except Exception as e:  # any form's read error names its file (jsonl.py and tables.py say where in it)
        if isinstance(e, UsageError) or not is_read_error(e):
            raise
        raise read_error(f.url, e) from None


def _error_of(e: BaseException, rank: int) -> List[Any]:
    if isinstance(e, UsageError):
        return [2, str(e)]
    if isinstance(e, RunFailure):
        return [1, str(e)]
    if isinstance(e, OSError):
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return [2, f"input error: cannot read the input{where} ({e.strerror or e}); check that it exists and is "
                   f"readable"]
    return [1, f"the input scan failed on rank {rank}: {type(e).__name__}: {e}"]


def _raise_first(errors: Sequence[Optional[List[Any]]]) -> None:
    """Every rank raises the same error: the first by rank (shares are in input order)."""
    for err in errors:
        if err:
            code, message = err
            raise UsageError(message) if code == 2 else RunFailure(message)


def _check_schemas(files: Sequence[InputFile], schemas: Dict[int, Dict[str, str]]) -> None:
    """The tables of one input have the same columns, of the same types."""
    items = sorted(schemas.items())
    if not items:
        return
    i0, s0 = items[0]
    for i, s in items[1:]:
        for col in list(s0) + [c for c in s if c not in s0]:
            a, b = s0.get(col), s.get(col)
            if a != b:
                what = (f"column '{col}' is {a} in {files[i0].url} but {b} in {files[i].url}" if a and b else
                        f"column '{col}' is in {files[i0 if a else i].url} but not in {files[i if a else i0].url}")
                raise UsageError(f"input error: the input files' schemas disagree: {what}; give files of one schema "
                                 f"(or run them separately)")


def shared_scan(locs: Sequence[str], input_format: str, spec: RecordSpec, offset_every: int, skip_bad: bool = False,
                group: Any = None, storage_options: Optional[Dict[str, Any]] = None, scanners: Any = None,
                order_mode: Any = "auto") -> ScanResult:
    """The shared scan (see the module's docstring). group: spmd_dp/control/comm.py's group (None: a world of one);
    scanners: scanners.Scanners that scan this rank's pieces (else this thread does); order_mode: prefix_affinity
    (auto or true: with spec.prompt_key set, spmd_dp/inputs/order.py)."""
    group = group or LocalGroup()
    rank, world, root = group.rank, group.world, group.is_rank0
    t0, cpu0 = time.monotonic(), time.thread_time()
    # 1. the file list, from rank 0
    listing: Optional[Dict[str, Any]] = None
    if root:
        try:
            files, notes = resolve(locs, input_format, storage_options)
            listing = {"files": [f.to_json() for f in files], "notes": notes}
        except UsageError as e:
            listing = {"error": [2, str(e)]}
        except Exception as e:  # a bug, or an fsspec backend's own error type
            listing = {"error": _error_of(e, rank)}
    listing = group.broadcast_json(listing)
    _raise_first([listing.get("error")])
    files = [InputFile.from_json(d) for d in listing["files"]]
    notes = listing["notes"]
    if root:
        for note in notes:
            logger.info("input: %s", note)
        kinds = sorted({f.kind + (f"+{f.compression}" if f.compression else "") for f in files})
        logger.info("input: %d files (%s, %.1f MB) from %s", len(files), ", ".join(kinds),
                    sum(f.size for f in files) / 1e6, ", ".join(locs))

    # 2. this rank's share
    pieces = plan_pieces(files)
    owners = assign(pieces, files, world)
    mine = [i for i, r in enumerate(owners) if r == rank]
    share = [pieces[i].describe(files) for i in mine]
    logger.info("input: rank %d scans %d of %d pieces (%.1f MB)%s%s", rank, len(mine), len(pieces),
                sum(pieces[i].stop - pieces[i].start for i in mine) / 1e6, ": " if share else "",
                "; ".join(share[:3]) + (f"; ... {share[-1]}" if len(share) > 3 else ""))
    keylists: Dict[int, KeyList] = {}
    prefixes: Dict[int, PrefixList] = {}
    bads: Dict[int, list] = {}
    summary: Dict[str, Any] = {"error": None, "pieces": {}}
    try:
        if scanners is not None:  # processes forked before the engine started (scanners.py)
            done = scanners.scan(files, [(i, pieces[i]) for i in mine], rank)
        else:
            done = []
            for i in mine:
                keys, bad = KeyList(), []
                r, pl = _scan_piece(pieces[i], files[pieces[i].file], spec, offset_every, keys, bad, storage_options)
                done.append((i, {**r, "locator": locator_to_json(r["locator"])}, keys, bad, pl))
        for i, r, keys, bad, pl in done:
            keylists[i], bads[i] = keys, bad
            if pl is not None:
                prefixes[i] = pl
            summary["pieces"][str(i)] = {**r, "bad": len(bad)}
    except Exception as e:
        summary = {"error": _error_of(e, rank), "pieces": {}}

    # 3. merge: every rank builds the same index
    gathered = [json.loads(b) for b in group.all_gather_bytes(json.dumps(summary).encode())]
    _raise_first([g["error"] for g in gathered])
    merged: Dict[int, Dict[str, Any]] = {int(k): v for g in gathered for k, v in g["pieces"].items()}
    assert sorted(merged) == list(range(len(pieces))), "every piece is scanned by exactly one rank"
    first: Dict[int, int] = {}
    line_base: Dict[int, int] = {}
    pos, lines_before = 0, {}
    indexed = []
    for i, p in enumerate(pieces):
        m = merged[i]
        first[i], line_base[i] = pos, lines_before.get(p.file, 0)
        lines_before[p.file] = line_base[i] + m["lines"]
        indexed.append(IndexedPiece(p.file, pos, m["records"], locator_from_json(m["locator"]), m["crc"], m["nbytes"]))
        pos += m["records"]
    _check_schemas(files, {pieces[i].file: m["schema"] for i, m in merged.items() if m["schema"] is not None})
    if pos == 0:
        what = files[0].url if len(files) == 1 else f"the {len(files)} input files"
        raise UsageError(f"input error: {what} holds no records; give a JSONL file with one JSON object per line "
                         f"(or Parquet, or a Hugging Face dataset folder)")
    index = InputIndex(files, indexed, offset_every, storage_options=storage_options)

    # 3b. the order records are generated in (prefix affinity): rank 0 builds it from every rank's keys
    keyed = spec.prompt_key is not None
    mode = order_mode if not any(f.compression for f in files) else "claims"  # see order.build
    try:
        order = shared_order(group, pos, payload(prefixes, first) if keyed else None, spec.whole_key, mode)
    except RuntimeError as e:
        raise RunFailure(str(e)) from None
    prefixes.clear()

    # 4. duplicate keys, partitioned by hash
    received = group.alltoall_bytes(outgoing(keylists, first, line_base, world))
    keylists.clear()
    found = find_duplicates(received)
    del received

    # 5. bad records: this rank's (its pieces' and the duplicates it owns), then everybody's
    def where(position: int, line: int, other: int) -> str:
        f = index.file_of(position)
        unit = f"row {line}" if f.kind != "jsonl" else f"line {line}"
        return unit if f is index.file_of(other) else (f"{f.url}: {unit}" if f.kind != "jsonl" else f"{f.url}:{line}")

    mine_bad = []
    for i, rows in bads.items():
        f = files[pieces[i].file]
        for rec, line, key, reason in rows:
            mine_bad.append(BadRecord(first[i] + rec, line_base[i] + line, key, reason, f.url, f.kind != "jsonl"))
    for position, line, first_pos, first_line, key_bytes in found:
        f = index.file_of(position)
        key = decode_key(key_bytes)
        mine_bad.append(BadRecord(position, line, key, f"duplicate primary key {key!r} (first at "
                                  f"{where(first_pos, first_line, position)}); primary keys must be unique",
                                  f.url, f.kind != "jsonl"))
    mine_bad.sort(key=lambda b: b.position)
    bad: List[BadRecord] = []
    if skip_bad:
        positions = group.all_gather_bytes(np.array([b.position for b in mine_bad], dtype=np.uint64).tobytes())
        index.bad = frozenset(int(x) for data in positions for x in np.frombuffer(data, dtype=np.uint64))
        details = group.gather_bytes(json.dumps([b.to_json() for b in mine_bad]).encode())
        if root:
            bad = sorted((BadRecord.from_json(d) for data in details for d in json.loads(data)),
                         key=lambda b: b.position)
        n_bad = len(index.bad)
    else:
        counts = [json.loads(b) for b in group.all_gather_bytes(json.dumps(
            [len(mine_bad), mine_bad[0].to_json() if mine_bad else None]).encode())]
        n_bad = sum(c for c, _ in counts)
        if n_bad:
            first_bad = min((BadRecord.from_json(d) for _, d in counts if d), key=lambda b: b.position)
            more = f" (and {n_bad - 1} more bad records)" if n_bad > 1 else ""
            raise UsageError(f"input error: {first_bad.where}: {first_bad.reason}{more}; fix the input, or set "
                             f"on_bad_record=skip to write bad records to the errors file and run the rest")
    seconds, cpu = time.monotonic() - t0, time.thread_time() - cpu0 + (scanners.cpu_s if scanners else 0.0)
    logger.info("input index: %d records in %d files, %d pieces, digest %s (scan %.2f s, this rank's cpu %.2f s; "
                "%.0f records/s, %.1f MB/s)", index.n_records, len(files), len(pieces), index.digest()[:16], seconds,
                cpu, index.n_records / seconds if seconds else 0, index.size / 1e6 / seconds if seconds else 0)
    if keyed and root:
        logger.info("record order: %s", order.describe())
    return ScanResult(index, bad, n_bad, seconds, notes, order)


def scan_input(path, spec: RecordSpec, offset_every: int, skip_bad: bool = False, input_format: str = "auto",
               storage_options: Optional[Dict[str, Any]] = None) -> Tuple[InputIndex, List[BadRecord]]:
    """The scan in one process: a file, folder, glob or URL (or a list of them). (index, bad records)."""
    locs = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    result = shared_scan(locations("", locs), input_format, spec, offset_every, skip_bad, LocalGroup(), storage_options)
    return result.index, result.bad
