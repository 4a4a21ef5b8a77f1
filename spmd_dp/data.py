"""The input: a JSONL file of records, validated in one streaming pass and read by batch.

Rank 0 scans the file once (`scan_input`): every record is checked (a JSON
object with the primary key and a string prompt, keys unique), the file is
hashed for the resume journal, and the byte offset of every `stride`-th record
is kept. Any rank then reads the records of a batch by seeking (`read_batch`),
so no rank holds the dataset in memory. Blank lines are not records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from spmd_dp.errors import UsageError


@dataclass(frozen=True)
class InputIndex:
    path: str
    size: int
    sha256: str
    n_records: int
    stride: int
    offsets: Tuple[int, ...] = field(repr=False)  # byte offset of record k*stride

    def to_json(self) -> Dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "n_records": self.n_records,
                "stride": self.stride, "offsets": list(self.offsets)}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "InputIndex":
        return cls(d["path"], d["size"], d["sha256"], d["n_records"], d["stride"], tuple(d["offsets"]))


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


def scan_input(path: Path, spec: RecordSpec, stride: int) -> InputIndex:
    """Validate every record in one pass; raise UsageError naming file and line on the first bad one."""
    if not path.is_file():
        raise UsageError(f"input error: {path} does not exist; set data_dir= and input_data_path= "
                         f"(absolute paths work too)")
    digest = hashlib.sha256()
    offsets: List[int] = []
    keys: Dict[Any, int] = {}
    n = 0
    pos = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            start, pos = pos, pos + len(raw)
            if not raw.strip():
                continue
            record, err = _parse(raw)
            err = err or spec.check(record)
            if err:
                raise UsageError(f"input error: {path}:{lineno}: {err}")
            key = record[spec.primary_key]
            if key in keys:
                raise UsageError(f"input error: {path}:{lineno}: duplicate primary key {key!r} "
                                 f"(first at line {keys[key]}); primary keys must be unique")
            keys[key] = lineno
            if n % stride == 0:
                offsets.append(start)
            n += 1
    if n == 0:
        raise UsageError(f"input error: {path} holds no records; give a JSONL file with one JSON object per line")
    return InputIndex(str(path.resolve()), pos, digest.hexdigest(), n, stride, tuple(offsets))


def read_batch(index: InputIndex, start: int, stop: int) -> List[Dict[str, Any]]:
    """Records [start, stop) of the input, by seeking to the nearest indexed offset."""
    out: List[Dict[str, Any]] = []
    skip = start % index.stride
    with open(index.path, "rb") as f:
        f.seek(index.offsets[start // index.stride])
        for raw in f:
            if not raw.strip():
                continue
            if skip:
                skip -= 1
                continue
            out.append(json.loads(raw))
            if len(out) == stop - start:
                break
    if len(out) != stop - start:
        raise RuntimeError(f"{index.path} changed while running: records {start}..{stop} are gone")
    return out
