"""What a record is, whatever file holds it: a JSON object with a primary key that the prompt builder accepts.

`RecordSpec.check` says why a record is not valid (or None); `BadRecord` is one that
is not, named by file and line (JSONL, 1-based) or row (Parquet/Arrow, 0-based).
`parse_line` turns a JSONL line into a value (msgspec when installed, which vLLM
brings; json for the exact error message); `encode_key` is the bytes a primary key is
compared and hashed by (its type is part of it: 7 and "7" are different keys).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

try:
    import msgspec

    _decode = msgspec.json.Decoder().decode
    _DecodeError: type = msgspec.DecodeError
except ImportError:  # pragma: no cover - msgspec comes with vLLM; json alone is 5x slower
    _decode, _DecodeError = None, ValueError


@dataclass(frozen=True)
class RecordSpec:
    """What makes a record valid: a JSON object with a primary key that the prompt builder accepts."""

    primary_key: str
    prompt_check: Callable[[Dict[str, Any]], Optional[str]]  # PromptBuilder.check
    # tables only: the record needs one of these columns for its prompt (None: a template decides, unknown)
    prompt_columns: Optional[Tuple[str, ...]] = None
    # prefix affinity: PromptBuilder.check_keyed (the check, and what the record's prefix key is taken from);
    # None: no keys are taken (prefix_affinity=false)
    prompt_key: Optional[Callable[[Dict[str, Any]], Tuple[Optional[str], Optional[bytes]]]] = None
    whole_key: bool = False  # prefix_field: the key is the whole value (one level), not a prompt's prefixes

    def check(self, record: Any) -> Optional[str]:
        """None if the record is valid, else why not."""
        why = self._check_key(record)
        return why if why is not None else self.prompt_check(record)

    def check_keyed(self, record: Any) -> Tuple[Optional[str], Optional[bytes]]:
        """`check`, and the bytes of the record's prefix key (None: it has none)."""
        why = self._check_key(record)
        if why is not None:
            return why, None
        return self.prompt_key(record) if self.prompt_key is not None else (self.prompt_check(record), None)

    def _check_key(self, record: Any) -> Optional[str]:
        if not isinstance(record, dict):
            return f"a record must be a JSON object, got {type(record).__name__}"
        key = record.get(self.primary_key)
        if key is None:
            return f"no primary key field '{self.primary_key}' (set primary_key=<field>)"
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            return f"primary key '{self.primary_key}' must be a string or an integer, got {type(key).__name__}"
        return None


@dataclass(frozen=True)
class BadRecord:
    position: int  # among the input's records (all files, in input order)
    line: int  # JSONL: the line in its file (1-based); tables: the row in its file (0-based)
    key: Any  # the primary key, when it could be read
    reason: str
    file: str = ""
    row: bool = False  # `line` is a table row

    @property
    def where(self) -> str:
        return f"{self.file}: row {self.line}" if self.row else f"{self.file}:{self.line}"

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "row" if self.row else "line": self.line, "position": self.position,
                "key": self.key, "error": self.reason}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "BadRecord":
        row = "row" in d
        return cls(d["position"], d["row"] if row else d["line"], d["key"], d["error"], d["file"], row)


def parse_line(raw: bytes) -> Tuple[Any, Optional[str]]:
    """A JSONL line's value, or why it is not JSON (naming the byte or column)."""
    if _decode is not None:
        try:
            return _decode(raw), None
        except _DecodeError:
            pass  # json says why (and accepts what msgspec does not: NaN, lone surrogates)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"


def encode_key(key: Any) -> bytes:
    """A primary key as bytes (its type first): what duplicates are found by."""
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    return b"i" + str(key).encode()


def decode_key(data: bytes) -> Any:
    text = data[1:].decode("utf-8", "surrogatepass")
    return text if data[:1] == b"s" else int(text)


def key_hash(encoded: bytes) -> int:
    """64 bits of a key's hash (CRC-32 and Adler-32, zlib's, the fastest in the standard library): which rank
    checks it for duplicates, and the order there. Equal hashes are told apart by comparing the keys."""
    return zlib.crc32(encoded) << 32 | zlib.adler32(encoded)
