"""Parquet files and Arrow IPC files (a Hugging Face dataset's), through pyarrow: scanning a piece, reading rows.

A Parquet piece is the row groups that start in its byte range of the file (from the
footer: every piece of a file reads it); an Arrow piece is a whole file, whose record
batches are found by walking its messages (the stream format that `save_to_disk`
writes; the file format with a footer works too). A piece's locator is its units as
`[unit, rows]`: the row group, the byte offset of a stream's record batch, or a file's
batch number. A rank reads a batch's rows by decoding only the units they lie in (the
last unit decoded is kept: consecutive batches mostly fall in one). Rows become JSON
objects (timestamps, decimals, bytes become strings), the same whatever the file.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import zlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from spmd_dp.errors import UsageError
from spmd_dp.inputs.records import encode_key
from spmd_dp.inputs.sources import InputFile, filesystem, is_url

ARROW_FILE_MAGIC = b"ARROW1"


def column_types(schema: pa.Schema) -> Dict[str, str]:
    """Each column's type, with widths and string flavours folded (int32 and int64 agree, string and large_string)."""
    def name(t: pa.DataType) -> str:
        if pa.types.is_integer(t):
            return "integer"
        if pa.types.is_floating(t):
            return "float"
        if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t):
            return "string"
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return f"list<{name(t.value_type)}>"
        if pa.types.is_struct(t):
            return "struct<" + ", ".join(f"{t.field(i).name}: {name(t.field(i).type)}" for i in range(t.num_fields)) + ">"
        return str(t)
    return {f.name: name(f.type) for f in schema}


def _needs_conversion(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _needs_conversion(t.value_type)
    if pa.types.is_struct(t):
        return any(_needs_conversion(t.field(i).type) for i in range(t.num_fields))
    return (pa.types.is_temporal(t) or pa.types.is_decimal(t) or pa.types.is_binary(t) or
            pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_map(t))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, tuple):  # a map's (key, value) entries
        return [_jsonable(x) for x in v]
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, datetime.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(v).decode()
    return v


def to_records(table) -> List[Dict[str, Any]]:
    """Rows as JSON objects (what a JSONL line would have held)."""
    rows = table.to_pylist()
    if any(_needs_conversion(f.type) for f in table.schema):
        rows = [_jsonable(r) for r in rows]
    return rows


def check_columns(f: InputFile, schema: pa.Schema, primary_key: str, prompt_columns: Optional[Tuple[str, ...]]) -> None:
    names = schema.names
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    if primary_key not in names:
        raise UsageError(f"input error: {f.url} has no column '{primary_key}' for the primary key (columns: {shown}); "
                         f"set primary_key=<column>")
    if prompt_columns and not any(c in names for c in prompt_columns):
        raise UsageError(f"input error: {f.url} has no column '{prompt_columns[0]}' for the prompt (columns: {shown}); "
                         f"set prompt_field=<column>, or give a prompt_template")


def _source(f: InputFile, storage_options):
    if not is_url(f.url):
        return pa.memory_map(f.url)
    fs, path = filesystem(f.url, storage_options)
    return pa.PythonFile(fs.open(path, "rb"), mode="r")


def _corrupt(f: InputFile, what: str, e: BaseException, where: str = "") -> UsageError:
    """where: ' in row group 3', ' in record batch 2' (where known)."""
    text = " ".join(str(e).split())[:200]
    return UsageError(f"input error: {f.url} is not a readable {what} file{where} ({type(e).__name__}: {text}); "
                      f"replace it or leave it out of input_data_path (on_bad_record=skip skips bad records, not "
                      f"unreadable files)")


# -- Parquet --------------------------------------------------------------------------------------
def _row_group_start(rg) -> int:
    col = rg.column(0)
    if col.has_dictionary_page and col.dictionary_page_offset:
        return min(col.dictionary_page_offset, col.data_page_offset)
    return col.data_page_offset


class ParquetUnits:
    def __init__(self, f: InputFile, storage_options=None) -> None:
        self.f = f
        try:
            self.pf = pq.ParquetFile(_source(f, storage_options))
            self.md = self.pf.metadata
            self.schema = self.pf.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _corrupt(f, "Parquet", e) from None
        self.last: Tuple[Any, Any] = (None, None)
        self.crc = 0

    def scan(self, start: int, stop: int) -> Iterator[Tuple[int, int, Any]]:
        """(row group, its first row in the file, its table) of the row groups that start in bytes [start, stop).
        The piece at byte 0 checksums the footer: the row groups' sizes, offsets and statistics."""
        if start == 0:
            self.crc = zlib.crc32(repr(self.md.to_dict()).encode())
        row = 0
        for i in range(self.md.num_row_groups):
            rg = self.md.row_group(i)
            if start <= _row_group_start(rg) < stop:
                yield i, row, self._read(i)
            row += rg.num_rows

    def _read(self, i: int):
        try:
            return self.pf.read_row_group(i)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _corrupt(self.f, "Parquet", e, f" in row group {i} (of {self.md.num_row_groups})") from None

    def unit(self, i: int):
        if self.last[0] != i:
            self.last = (i, self._read(i))
        return self.last[1]


# -- Arrow IPC ------------------------------------------------------------------------------------
class ArrowUnits:
    def __init__(self, f: InputFile, storage_options=None) -> None:
        self.f = f
        self.last: Tuple[Any, Any] = (None, None)
        self.crc = 0
        try:
            self.src = _source(f, storage_options)
            self.file_format = self.src.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
            self.src.seek(0)
            if self.file_format:
                self.reader = pa.ipc.open_file(self.src)
                self.schema = self.reader.schema
            else:
                self.schema = pa.ipc.read_schema(pa.ipc.read_message(self.src))
        except (pa.ArrowException, OSError, ValueError, EOFError) as e:
            raise _corrupt(f, "Arrow", e) from None
        if any(pa.types.is_dictionary(t.type) for t in self.schema):
            raise UsageError(f"input error: {f.url} has dictionary-encoded columns, which spmd_dp cannot read by "
                             f"batch; save it as Parquet (or with datasets.Dataset.save_to_disk)")

    def scan(self, start: int, stop: int) -> Iterator[Tuple[int, int, Any]]:
        """(unit, first row, table) of every record batch of the file (an Arrow file is one piece), checksumming
        its messages. A stream's unit is the byte offset of the batch's message, a file's the batch number."""
        row = batches = 0
        try:
            if self.file_format:
                for i in range(self.reader.num_record_batches):
                    batches = i
                    batch = self.reader.get_batch(i)
                    self.crc = zlib.crc32(memoryview(batch.serialize()), self.crc)
                    yield i, row, pa.Table.from_batches([batch])
                    row += batch.num_rows
                return
            self.src.seek(0)
            pa.ipc.read_message(self.src)  # the schema
            while True:
                offset = self.src.tell()
                try:
                    msg = pa.ipc.read_message(self.src)
                except EOFError:
                    return
                self.crc = zlib.crc32(memoryview(msg.body), zlib.crc32(memoryview(msg.metadata), self.crc))
                if msg.type == "record batch":
                    batch = pa.ipc.read_record_batch(msg, self.schema)
                    yield offset, row, pa.Table.from_batches([batch])
                    row += batch.num_rows
                    batches += 1
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _corrupt(self.f, "Arrow", e, f" in record batch {batches} (after row {row})") from None

    def unit(self, u: int):
        if self.last[0] != u:
            try:
                if self.file_format:
                    batch = self.reader.get_batch(u)
                else:
                    self.src.seek(u)
                    batch = pa.ipc.read_record_batch(pa.ipc.read_message(self.src), self.schema)
            except (pa.ArrowException, OSError, ValueError, EOFError) as e:
                raise _corrupt(self.f, "Arrow", e, " while reading a batch") from None
            self.last = (u, pa.Table.from_batches([batch]))
        return self.last[1]


def open_units(f: InputFile, storage_options=None):
    return ParquetUnits(f, storage_options) if f.kind == "parquet" else ArrowUnits(f, storage_options)


def scan_piece(f: InputFile, start: int, stop: int, spec, keys, bad: list, storage_options=None,
               prefixes=None) -> Dict[str, Any]:
    """Validate the rows of a piece: keys.add(key bytes, record, row) for each valid one; bad gets
    (record, row, key, reason) for the others. Rows are numbered in the file (the piece's line base is 0).
    prefixes (a prefixes.PrefixList, or None): each valid row's prefix key."""
    units = open_units(f, storage_options)
    check_columns(f, units.schema, spec.primary_key, spec.prompt_columns)
    n = 0
    pk = spec.primary_key
    locator = []
    for u, first_row, table in units.scan(start, stop):
        locator.append([u, table.num_rows])
        for j, record in enumerate(to_records(table)):
            err, data = spec.check_keyed(record) if prefixes is not None else (spec.check(record), None)
            if err is None:
                keys.add(encode_key(record[pk]), n, first_row + j)
                if prefixes is not None:
                    prefixes.add(n, data)
            else:
                key = record.get(pk)
                bad.append((n, first_row + j, key if isinstance(key, (str, int)) and not isinstance(key, bool)
                            else None, err))
            n += 1
    return {"records": n, "lines": 0, "locator": locator, "crc": units.crc, "nbytes": 0,
            "schema": column_types(units.schema)}


def read_rows(units, locator: List[List[int]], first: int, count: int) -> List[Dict[str, Any]]:
    """Rows [first, first+count) of a piece whose units are `locator`."""
    out: List[Dict[str, Any]] = []
    pos = 0
    for u, rows in locator:
        lo, hi = max(first, pos), min(first + count, pos + rows)
        if lo < hi:
            out += to_records(units.unit(u).slice(lo - pos, hi - lo))
        pos += rows
        if pos >= first + count:
            break
    return out


def pick_rows(units, locator: List[List[int]], wanted: List[int]) -> List[Dict[str, Any]]:
    """Rows `wanted` (ascending numbers in a piece whose units are `locator`): each unit decoded once."""
    out: List[Dict[str, Any]] = []
    pos, i = 0, 0
    for u, rows in locator:
        j = i
        while j < len(wanted) and wanted[j] < pos + rows:
            j += 1
        if j > i:
            out += to_records(units.unit(u).take([w - pos for w in wanted[i:j]]))
            i = j
        pos += rows
        if i == len(wanted):
            break
    return out
