"""The merged index every rank holds, and reading the records of a batch through it.

It is small: the files, and per piece its first record (position in the whole input),
its record count and its locator (JSONL: a byte offset per `offset_every` records; tables:
one entry per row group or record batch); plus the positions of bad records skipped
(on_bad_record=skip). No record, no key. `read(start, stop)` reads records [start,
stop) of the input (None for a skipped one), crossing pieces and files as needed,
keeping files open and the last decoded row group between batches.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional

import numpy as np

from spmd_dp.inputs.jsonl import JsonlReader
from spmd_dp.inputs.sources import InputFile
from spmd_dp.inputs.tables import open_units, pick_rows, read_rows

OPEN_FILES = 16  # readers kept open per rank


@dataclass
class IndexedPiece:
    file: int  # index into InputIndex.files
    first: int  # its first record's position in the input
    records: int
    locator: Any  # JSONL: np.uint64 byte offsets, one per offset_every records; tables: [[unit, rows], ...]
    crc: int = 0  # CRC-32 of its content (JSONL: its lines; Parquet: the footer; Arrow: the messages)
    nbytes: int = 0  # JSONL: the bytes of its lines (to combine the pieces' CRCs into the file's)

    def locator_json(self) -> Any:
        return locator_to_json(self.locator)


def _gf2_times(mat: List[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from those of A and of B (len2 bytes): zlib's crc32_combine, which Python's zlib lacks."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = [_gf2_times(odd, odd[n]) for n in range(32)]  # two zero bits
    odd = [_gf2_times(even, even[n]) for n in range(32)]  # four
    while True:
        even = [_gf2_times(odd, odd[n]) for n in range(32)]
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = [_gf2_times(even, even[n]) for n in range(32)]
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def locator_to_json(locator: Any) -> Any:
    """JSONL offsets as base64 of little-endian uint64 (compact to all-gather); tables' lists as they are."""
    if isinstance(locator, list):
        return locator
    return base64.b64encode(np.asarray(locator, dtype="<u8").tobytes()).decode()


def locator_from_json(value: Any) -> Any:
    return np.frombuffer(base64.b64decode(value), dtype="<u8") if isinstance(value, str) else value


class InputIndex:
    def __init__(self, files: List[InputFile], pieces: List[IndexedPiece], offset_every: int,
                 bad: FrozenSet[int] = frozenset(), storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.files, self.pieces, self.offset_every, self.bad = files, pieces, offset_every, bad
        self.storage_options = storage_options
        self.n_records = sum(p.records for p in pieces)
        self._nonempty = [p for p in pieces if p.records]
        self._firsts = [p.first for p in self._nonempty]
        self._readers: "OrderedDict[int, Any]" = OrderedDict()

    # -- what it is -------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def piece_of(self, position: int) -> IndexedPiece:
        return self._nonempty[bisect_right(self._firsts, position) - 1]

    def file_of(self, position: int) -> InputFile:
        return self.files[self.piece_of(position).file]

    def content(self) -> List[List[Any]]:
        """[name, size, checksum] per file: what the resume fingerprint compares. Names are relative to the
        files' common folder (moving the whole input keeps it); the checksum is of the content, not the time."""
        urls = [f.url for f in self.files]
        root = posixpath.dirname(posixpath.commonprefix(urls)) if len(urls) > 1 else posixpath.dirname(urls[0])
        crcs = [0] * len(self.files)
        for p in self.pieces:  # a JSONL file's: the CRC-32 of all its bytes, however it was cut into pieces
            crcs[p.file] = crc32_combine(crcs[p.file], p.crc, p.nbytes) if p.nbytes else crcs[p.file] ^ p.crc
        return [[f.url[len(root):].lstrip("/"), f.size, f"{crc:08x}"] for f, crc in zip(self.files, crcs)]

    def content_sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.content(), self.n_records]).encode()).hexdigest()

    def digest(self) -> str:
        """Everything a rank reads by: equal on every rank of a run, and equal to a one-rank scan's."""
        h = hashlib.sha256(json.dumps([[f.to_json() for f in self.files], self.offset_every, sorted(self.bad)]).encode())
        for p in self.pieces:
            h.update(json.dumps([p.file, p.first, p.records, p.crc, p.nbytes, p.locator_json()]).encode())
        return h.hexdigest()

    # -- reading ------------------------------------------------------------------------------------
    def _reader(self, i: int):
        reader = self._readers.pop(i, None)
        if reader is None:
            f = self.files[i]
            reader = JsonlReader(f, self.storage_options) if f.kind == "jsonl" else open_units(f, self.storage_options)
            if len(self._readers) >= OPEN_FILES:
                _, old = self._readers.popitem(last=False)
                if hasattr(old, "close"):
                    old.close()
        self._readers[i] = reader
        return reader

    def read(self, start: int, stop: int) -> List[Optional[Dict[str, Any]]]:
        """Records [start, stop) of the input, in order; None for a skipped bad record."""
        out: List[Optional[Dict[str, Any]]] = []
        pos = start
        while pos < stop:
            p = self.piece_of(pos)
            count = min(stop, p.first + p.records) - pos
            reader = self._reader(p.file)
            if self.files[p.file].kind == "jsonl":
                out += reader.read(p.locator, self.offset_every, pos - p.first, count)
            else:
                out += read_rows(reader, p.locator, pos - p.first, count)
            pos += count
        if self.bad:
            out = [None if start + i in self.bad else r for i, r in enumerate(out)]
        return out

    def read_positions(self, positions: List[int]) -> List[Optional[Dict[str, Any]]]:
        """The records at these positions (ascending), in that order; None for a skipped bad record. Each piece is
        read once, forward, parsing only the records asked for (prefix affinity: a batch's records are scattered)."""
        out: List[Optional[Dict[str, Any]]] = []
        i = 0
        while i < len(positions):
            p = self.piece_of(positions[i])
            end = p.first + p.records
            j = i
            while j < len(positions) and positions[j] < end:
                j += 1
            wanted = [q - p.first for q in positions[i:j]]
            reader = self._reader(p.file)
            if self.files[p.file].kind == "jsonl":
                out += reader.pick(p.locator, self.offset_every, wanted)
            else:
                out += pick_rows(reader, p.locator, wanted)
            i = j
        if self.bad:
            out = [None if q in self.bad else r for q, r in zip(positions, out)]
        return out

    def close(self) -> None:
        for reader in self._readers.values():
            if hasattr(reader, "close"):
                reader.close()
        self._readers.clear()


def read_batch(index: InputIndex, start: int, stop: int) -> List[Optional[Dict[str, Any]]]:
    """Records [start, stop) of the input (None for a skipped bad record)."""
    return index.read(start, stop)
