"""JSON Lines: scanning a byte range of a file, reading records from byte offsets.

A piece of a JSONL file is a byte range; its records are the lines that start in it
(the first line of a piece that does not start the file is found after the first
newline at or after start - 1), so pieces cut anywhere and every line falls in exactly
one. Blank lines are not records; every other line is one, valid or not, so a position
never depends on validation. The locator of a piece is the byte offset of every
`offset_every`-th record of it (offset_every = batch_size): a batch is read by seeking to the nearest and skipping at most
offset_every - 1 lines. A compressed file (gzip, zstd: fsspec decompresses) is one piece, and
is read by decompressing forward from where the last read stopped (it cannot seek back
cheaply: reading it again from the start when a batch lies behind).
"""

from __future__ import annotations

import zlib
from array import array
from typing import Any, Dict, List, Optional

from spmd_dp.inputs.records import encode_key, parse_line
from spmd_dp.inputs.sources import InputFile, is_read_error, open_file, read_error

READ_BLOCK = 1 << 20  # object stores: bytes fetched per request when reading batches


def scan_piece(f: InputFile, start: int, stop: int, spec, offset_every: int, keys, bad: list,
               storage_options=None, prefixes=None) -> Dict[str, Any]:
    """Validate the records of the lines that start in [start, stop). keys.add(key bytes, record, line) for each
    valid record; bad gets (record, line, key, reason) for the others; lines count from 1 in the piece.
    prefixes (a prefixes.PrefixList, or None): each valid record's prefix key."""
    offsets = array("Q")
    check, pk = spec.check, spec.primary_key
    check_keyed, add_prefix = spec.check_keyed, (prefixes.add if prefixes is not None else None)
    data = None
    blob, add_end, add_record, add_line = keys.blob, keys.ends.append, keys.records.append, keys.lines.append
    n = lines = 0
    crc = 0
    pos = start
    try:
        with open_file(f, storage_options, block_size=8 << 20) as fh:
            if start > 0:
                fh.seek(start - 1)
                pos = start - 1 + len(fh.readline())  # the rest of the line that started before this piece
            begin = pos
            readline = fh.readline
            while pos < stop:
                raw = readline()
                if not raw:
                    break
                here, pos = pos, pos + len(raw)
                crc = zlib.crc32(raw, crc)
                lines += 1
                if raw.isspace():
                    continue
                if n % offset_every == 0:
                    offsets.append(here)
                record, err = parse_line(raw)
                if err is not None and not raw.endswith(b"\n"):
                    err += "; the file ends in the middle of this line: is it truncated?"
                if err is None:
                    if add_prefix is None:
                        err = check(record)
                    else:
                        err, data = check_keyed(record)
                if err is None:
                    key = record[pk]  # keys.add(encode_key(key), n, lines), inlined: this loop is the scan's cost
                    blob += b"s" + key.encode("utf-8", "surrogatepass") if isinstance(key, str) else encode_key(key)
                    add_end(len(blob))
                    add_record(n)
                    add_line(lines)
                    if add_prefix is not None:
                        add_prefix(n, data)
                else:
                    key = record.get(pk) if isinstance(record, dict) else None
                    bad.append((n, lines, key if isinstance(key, (str, int)) and not isinstance(key, bool) else None, err))
                n += 1
    except Exception as e:  # decompression, truncation, I/O: the file is named, with where it broke
        if not is_read_error(e):
            raise
        where = f" past line {lines}" if f.compression else f" at byte {pos}"  # (decompressing reads ahead)
        raise read_error(f.url, e, where) from None
    return {"records": n, "lines": lines, "locator": offsets, "crc": crc, "nbytes": max(pos - begin, 0),
            "schema": None}


class JsonlReader:
    """Reads the records of one JSONL file by offset, keeping the file open between batches."""

    def __init__(self, f: InputFile, storage_options=None) -> None:
        self.f, self.storage_options = f, storage_options
        self.fh = None
        self.pos = 0  # compressed files: where the decompressed stream stands

    def _seek(self, offset: int) -> None:
        if self.fh is None or (self.f.compression and offset < self.pos):
            self.close()
            self.fh = open_file(self.f, self.storage_options, block_size=READ_BLOCK)
            self.pos = 0
        if self.f.compression is None:
            self.fh.seek(offset)
            return
        while self.pos < offset:  # forward in the decompressed stream
            chunk = self.fh.read(min(offset - self.pos, 1 << 20))
            if not chunk:
                break
            self.pos += len(chunk)

    def read(self, offsets, offset_every: int, first: int, count: int) -> List[Optional[Dict[str, Any]]]:
        """Records first..first+count-1 of a piece (numbered from 0 in the piece) whose locator is offsets."""
        try:
            return self._read(offsets, offset_every, first, count)
        except Exception as e:  # the file changed since the scan, or storage failed: name it
            if not is_read_error(e):
                raise
            raise read_error(self.f.url, e, " while reading a batch") from None

    def _read(self, offsets, offset_every: int, first: int, count: int) -> List[Optional[Dict[str, Any]]]:
        self._seek(int(offsets[first // offset_every]))
        skip = first % offset_every
        out: List[Any] = []
        readline = self.fh.readline
        while len(out) < count:
            raw = readline()
            if not raw:
                break
            self.pos += len(raw)
            if raw.isspace():
                continue
            if skip:
                skip -= 1
                continue
            record, err = parse_line(raw)
            out.append(record if err is None else None)
        if len(out) != count:
            raise RuntimeError(f"{self.f.url} changed while running: records are gone; rerun to rescan it")
        return out

    def pick(self, offsets, offset_every: int, wanted: List[int]) -> List[Optional[Dict[str, Any]]]:
        """Records `wanted` (ascending numbers in a piece whose locator is offsets), parsing only those: forward
        from the last one when the next is in reach (fewer lines than offset_every), else from the nearest offset."""
        out: List[Any] = []
        at = None  # the number of the record the next non-blank line holds
        for w in wanted:
            if at is None or w < at or w - at >= offset_every:
                self._seek(int(offsets[w // offset_every]))
                at = w - w % offset_every
            readline = self.fh.readline
            while True:
                raw = readline()
                if not raw:
                    raise RuntimeError(f"{self.f.url} changed while running: records are gone; rerun to rescan it")
                self.pos += len(raw)
                if raw.isspace():
                    continue
                at += 1
                if at - 1 == w:
                    break
            record, err = parse_line(raw)
            out.append(record if err is None else None)
        return out

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
