"""The input: a JSONL file of records, validated in one streaming pass and read by batch.

Rank 0 scans the file once (`scan_input`): every record is checked (a JSON
object with a unique primary key that the prompt builder accepts), the file is
hashed for the resume journal, and the byte offset of every `stride`-th record
is kept. Any rank then reads the records of a batch by seeking (`read_batch`),
so no rank holds the dataset in memory. Blank lines are not records; every other
line is one, valid or not, so a record's position never depends on validation.
With on_bad_record=fail the scan ends in one error naming the first bad line and
how many there are; with on_bad_record=skip the bad records are listed (they go
to the errors file) and left out of the work.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import numpy as np

from spmd_dp.errors import UsageError


@dataclass(frozen=True)
class InputIndex:
    path: str
    size: int
    sha256: str
    n_records: int
    stride: int
    offsets: Tuple[int, ...] = field(repr=False)  # byte offset of record k*stride
    bad: FrozenSet[int] = field(default=frozenset(), repr=False)  # positions of skipped bad records

    def to_json(self) -> Dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "n_records": self.n_records,
                "stride": self.stride, "offsets": list(self.offsets), "bad": sorted(self.bad)}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "InputIndex":
        return cls(d["path"], d["size"], d["sha256"], d["n_records"], d["stride"], tuple(d["offsets"]),
                   frozenset(d["bad"]))


@dataclass(frozen=True)
class BadRecord:
    position: int  # among the input's records (non-blank lines)
    line: int
    key: Any  # the primary key, when it could be read
    reason: str

    def to_json(self) -> Dict[str, Any]:
        return {"line": self.line, "position": self.position, "key": self.key, "error": self.reason}


@dataclass(frozen=True)
class RecordSpec:
    """What makes a line a valid record: a JSON object with a primary key that the prompt builder accepts."""

    primary_key: str
    prompt_check: Callable[[Dict[str, Any]], Optional[str]]  # PromptBuilder.check

    def check(self, record: Any) -> Optional[str]:
        """None if the record is valid, else why not."""
        if not isinstance(record, dict):
            return f"a record must be a JSON object, got {type(record).__name__}"
        key = record.get(self.primary_key)
        if key is None:
            return f"no primary key field '{self.primary_key}' (set primary_key=<field>)"
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            return f"primary key '{self.primary_key}' must be a string or an integer, got {type(key).__name__}"
        return self.prompt_check(record)


def _parse(raw: bytes) -> Tuple[Any, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"


class _Keys:
    """The primary keys seen, in 32 bytes each (hash, line, byte offset, position): duplicates are found at
    the end (sort by hash) and confirmed by reading both lines again. Rank 0's memory stays small for 100M keys."""

    def __init__(self) -> None:
        self.hashes, self.lines, self.offsets, self.positions = array("Q"), array("Q"), array("Q"), array("Q")

    @staticmethod
    def _hash(key: Any) -> int:
        return int.from_bytes(hashlib.blake2b(repr((type(key).__name__, key)).encode(), digest_size=8).digest(),
                              "little")

    def add(self, key: Any, line: int, offset: int, position: int) -> None:
        self.hashes.append(self._hash(key))
        self.lines.append(line)
        self.offsets.append(offset)
        self.positions.append(position)

    def duplicates(self, f, primary_key: str) -> List["BadRecord"]:
        """Every later occurrence of a key, naming the first; read back from the open file f."""
        if len(self.hashes) < 2:
            return []
        h = np.frombuffer(self.hashes, dtype=np.uint64)
        order = np.argsort(h, kind="stable")  # equal hashes stay in file order
        sorted_h = h[order]
        is_dup = np.concatenate(([False], sorted_h[1:] == sorted_h[:-1]))
        run_start = np.maximum.accumulate(np.where(is_dup, 0, np.arange(len(h))))  # first of each equal run
        out = []
        for i in np.flatnonzero(is_dup):
            a, b = int(order[run_start[i]]), int(order[i])
            key_a, key_b = (self._key_at(f, self.offsets[j], primary_key) for j in (a, b))
            if (type(key_a), key_a) == (type(key_b), key_b):  # not a 64-bit hash collision
                out.append(BadRecord(self.positions[b], self.lines[b], key_b,
                                     f"duplicate primary key {key_b!r} (first at line {self.lines[a]}); primary "
                                     f"keys must be unique"))
        return out

    @staticmethod
    def _key_at(f, offset: int, primary_key: str) -> Any:
        f.seek(offset)
        return json.loads(f.readline())[primary_key]


def scan_input(path: Path, spec: RecordSpec, stride: int, skip_bad: bool = False
               ) -> Tuple[InputIndex, List[BadRecord]]:
    """Validate every record in one pass. Bad records: a UsageError naming the first (file:line) and
    their count, or with skip_bad the list of them (their positions are left out of the work)."""
    if not path.is_file():
        raise UsageError(f"input error: {path} does not exist; set data_dir= and input_data_path= "
                         f"(absolute paths work too)")
    digest = hashlib.sha256()
    offsets: List[int] = []
    keys = _Keys()
    bad: List[BadRecord] = []
    n = 0
    pos = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"input error: cannot read {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            start, pos = pos, pos + len(raw)
            if not raw.strip():
                continue
            if n % stride == 0:
                offsets.append(start)
            record, err = _parse(raw)
            err = err or spec.check(record)
            key = record.get(spec.primary_key) if isinstance(record, dict) else None
            if err is None:
                keys.add(key, lineno, start, n)
            else:
                bad.append(BadRecord(n, lineno, key if isinstance(key, (str, int)) else None, err))
            n += 1
        bad = sorted(bad + keys.duplicates(f, spec.primary_key), key=lambda b: b.position)
    if n == 0:
        raise UsageError(f"input error: {path} holds no records; give a JSONL file with one JSON object per line")
    if bad and not skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad records)" if len(bad) > 1 else ""
        raise UsageError(f"input error: {path}:{first.line}: {first.reason}{more}; fix the input, or set "
                         f"on_bad_record=skip to write bad records to the errors file and run the rest")
    index = InputIndex(str(path.resolve()), pos, digest.hexdigest(), n, stride, tuple(offsets),
                       frozenset(b.position for b in bad))
    return index, bad


def read_batch(index: InputIndex, start: int, stop: int) -> List[Optional[Dict[str, Any]]]:
    """Records [start, stop) of the input (None for a skipped bad record), by seeking to the nearest
    indexed offset."""
    out: List[Optional[Dict[str, Any]]] = []
    skip = start % index.stride
    with open(index.path, "rb") as f:
        f.seek(index.offsets[start // index.stride])
        for raw in f:
            if not raw.strip():
                continue
            if skip:
                skip -= 1
                continue
            out.append(None if start + len(out) in index.bad else json.loads(raw))
            if len(out) == stop - start:
                break
    if len(out) != stop - start:
        raise RuntimeError(f"{index.path} changed while running: records {start}..{stop} are gone")
    return out
