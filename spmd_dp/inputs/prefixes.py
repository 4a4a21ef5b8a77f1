"""A record's prefix key, taken while the input is scanned: hashes of its prompt's leading bytes at a ladder of lengths.

`LEVELS` are prefix lengths in bytes (256, 512, 768, 1 KiB, then x1.5 / x1.33 up to 256 KiB): a record gets a 64-bit
hash of each prefix its prompt reaches; two records with equal hashes at a level share that many leading bytes (but
for a collision: see below). 256 bytes (~64 tokens, four of vLLM's 16-token KV blocks) is the least sharing worth
moving a record for: a shorter prompt has no key. A ladder, not one length, because the length that groups records
is not known before all are seen (a system prompt shared by all, then a document shared by a few: the order is a
trie over the levels, spmd_dp/inputs/order.py). With `prefix_field` the key is the field's whole value (one level).

The hashes are computed with numpy over many records at once (`PrefixList` buffers a piece's prompts, padded to
8-byte words): a polynomial hash of the prefix's words mod 2^64 from one running sum over the buffer (`ladders`),
mixed by splitmix64's finalizer. Per record the scan only copies its prompt's bytes: a Python hash call per level
costs more than parsing the record. The same on every machine (no seed, little-endian words).

What a reader would get wrong: the key is of the prompt before the chat template and the tokenizer (the engine's,
which the scan must not wait for): records whose prompts share leading characters share leading tokens under one
template (all but the token at the boundary). And a collision only places two records side by side: it can cost
cache hits, never a record.
"""

from __future__ import annotations

from array import array
from typing import Dict, List, Optional, Tuple

import numpy as np

LEVELS = (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536,
          98304, 131072, 196608, 262144)
BUFFER_BYTES = 4 << 20  # prompts buffered before their hashes are computed (the buffer is reused)
_U64 = np.dtype("<u8")
_BASE = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64
_INV = pow(_BASE, -1, 1 << 64)


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def level_weights(whole: bool) -> np.ndarray:
    """The bytes each level adds to what two records share (prefix_field: 1 for its one level)."""
    if whole:
        return np.ones(1, dtype=np.float64)
    return np.diff(np.array((0,) + LEVELS, dtype=np.float64))


_POWERS: Dict[int, np.ndarray] = {}


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64 (kept: every flush of a buffer of one size needs the same)."""
    have = _POWERS.get(base)
    if have is None or len(have) < n:
        out = np.full(max(n, 1), base, dtype=np.uint64)
        out[0] = 1
        have = _POWERS[base] = np.cumprod(out, dtype=np.uint64)
    return have[:n]


def ladders(buf, offsets: np.ndarray, lengths: np.ndarray, whole: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(levels per record, their hashes end to end) of prompts laid in `buf` (a buffer of 8-byte words) at 8-byte
    aligned offsets.

    The hash of a record's first m words w_0.. is sum(w_j * BASE^-j) mod 2^64, mixed with m: from one running sum
    over the whole buffer, G[i] = sum over t < i of word_t * BASE^-t, it is (G[s + m] - G[s]) * BASE^s for the record
    whose words start at s. Two passes over the buffer, then O(1) per record and level."""
    words = np.frombuffer(buf, dtype=_U64)
    starts = offsets.astype(np.int64) // 8
    n = len(starts)
    with np.errstate(over="ignore"):
        running = np.zeros(len(words) + 1, dtype=np.uint64)
        np.cumsum(words * _powers(_INV, len(words)), dtype=np.uint64, out=running[1:])
        scale = _powers(_BASE, len(words) + 1)[starts]

        def prefix(m: np.ndarray, sel) -> np.ndarray:
            s = starts[sel]
            return _splitmix((running[s + m] - running[s]) * scale[sel] + m.astype(np.uint64) * np.uint64(_BASE))

        if whole:  # one level: the whole value (its last word zero-padded), its length mixed in
            span = (lengths.astype(np.int64) + 7) // 8
            return np.ones(n, dtype=np.uint8), _splitmix(prefix(span, slice(None)) ^ lengths.astype(np.uint64))
        counts = np.searchsorted(np.array(LEVELS), lengths, side="right").astype(np.uint8)
        table = np.zeros((n, int(counts.max()) if n else 0), dtype=np.uint64)
        for i, length in enumerate(LEVELS[:table.shape[1]]):
            sel = np.flatnonzero(counts > i)
            table[sel, i] = prefix(np.full(len(sel), length // 8, dtype=np.int64), sel)
    return counts, table[np.arange(table.shape[1])[None, :] < counts[:, None]]


_PAD = tuple(b"\0" * (-k % 8) for k in range(8))


class _Scratch:
    """The buffer of prompts, one per process, reused by piece after piece: fresh memory costs a page fault every
    4 KiB, more than the copy. A list that takes it over has the one that held it compute its hashes first."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.owner: Optional["PrefixList"] = None

    def take(self, owner: "PrefixList") -> None:
        if self.owner is not None:
            self.owner._flush()
        self.owner = owner
        owner._pos = 0
        if not self.buf:
            self.buf = bytearray(BUFFER_BYTES)


_scratch = _Scratch()


class PrefixList:
    """The prefix keys of one scanned piece: each keyed record's number in the piece, its count of levels, the
    hashes end to end; and the weight of every keyed record (its prompt's bytes; prefix_field: 1). `add` only
    buffers the prompt (the scan's inner loop: a copy and two appends); the hashes are computed by numpy when the
    buffer (BUFFER_BYTES, shared by the process's lists: `_Scratch`) is full, and at the end."""

    def __init__(self, whole: bool = False) -> None:
        self.whole = whole
        self.records, self.counts, self.hashes = array("Q"), array("B"), array("Q")
        self.weight = 0
        self._pos = 0
        self._records, self._lengths = array("Q"), array("Q")

    def add(self, record: int, data: Optional[bytes]) -> None:
        """Record `record` of the piece, whose key is taken from `data` (None: it has no key)."""
        if data is None:
            return
        if self.whole:
            data = b"\x01" + data  # (never empty)
        n = len(data)
        if n < LEVELS[0] and not self.whole:
            self.weight += n
            return
        if _scratch.owner is not self:
            _scratch.take(self)
        buf = _scratch.buf
        pos = self._pos
        end = pos + ((n + 7) & -8)
        if end > len(buf):
            self._flush()
            pos, end = 0, (n + 7) & -8
            if end > len(buf):
                buf = _scratch.buf = bytearray(max(end, BUFFER_BYTES))
        buf[pos:pos + n] = data
        if self.whole:  # (its last word is hashed whole: zeros after the value; levels end at a word's end)
            buf[pos + n:end] = _PAD[n & 7]
        self._pos = end
        self._records.append(record)
        self._lengths.append(n)

    def _flush(self) -> None:
        if not self._records:
            return
        lengths = np.frombuffer(self._lengths, dtype=np.uint64)
        padded = (lengths + np.uint64(7)) & ~np.uint64(7)
        with memoryview(_scratch.buf) as mv:
            counts, hashes = ladders(mv[:self._pos], np.cumsum(padded) - padded, lengths, self.whole)
        self.weight += len(lengths) if self.whole else int(lengths.sum())
        self.records.extend(self._records)
        self.counts.frombytes(counts.tobytes())
        self.hashes.frombytes(hashes.astype(_U64).tobytes())
        self._pos = 0
        self._records, self._lengths = array("Q"), array("Q")

    def __len__(self) -> int:
        return len(self.records) + len(self._records)

    def to_bytes(self) -> Tuple[bytes, bytes, bytes, int]:
        """What a scanner process sends back (its pipe pickles bytes, not arrays)."""
        self._flush()
        return self.records.tobytes(), self.counts.tobytes(), self.hashes.tobytes(), self.weight

    @classmethod
    def from_bytes(cls, whole: bool, data: Tuple[bytes, bytes, bytes, int]) -> "PrefixList":
        out = cls(whole)
        out.records.frombytes(data[0])
        out.counts.frombytes(data[1])
        out.hashes.frombytes(data[2])
        out.weight = data[3]
        return out


def payload(lists: Dict[int, PrefixList], first: Dict[int, int]) -> bytes:
    """One rank's keys for rank 0, positions made global (first[piece]: the piece's first record):
    [keyed records, hashes, weight] then positions, hashes (little-endian uint64), then the counts (uint8)."""
    pieces = sorted(lists)
    for i in pieces:
        lists[i].to_bytes()  # (computes what is still buffered)
    positions = [np.frombuffer(lists[i].records, dtype=np.uint64) + np.uint64(first[i]) for i in pieces]
    counts = b"".join(lists[i].counts.tobytes() for i in pieces)
    hashes = b"".join(lists[i].hashes.tobytes() for i in pieces)
    weight = sum(lists[i].weight for i in pieces)
    head = np.array([len(counts), len(hashes) // 8, weight], dtype=_U64).tobytes()
    pos = np.concatenate(positions).astype(_U64).tobytes() if positions else b""
    return head + pos + hashes + counts


def unpack(payloads: List[bytes]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Every rank's keys: (positions, counts, hashes, total weight), positions ascending (ranks scan contiguous
    shares in input order)."""
    pos, counts, hashes, weight = [], [], [], 0
    for data in payloads:
        if not data:
            continue
        n, h, w = (int(x) for x in np.frombuffer(data, dtype=_U64, count=3))
        pos.append(np.frombuffer(data, dtype=_U64, count=n, offset=24))
        hashes.append(np.frombuffer(data, dtype=_U64, count=h, offset=24 + 8 * n))
        counts.append(np.frombuffer(data, dtype=np.uint8, count=n, offset=24 + 8 * n + 8 * h))
        weight += w
    if not pos:
        empty = np.zeros(0, dtype=_U64)
        return empty, np.zeros(0, dtype=np.uint8), empty, weight
    return np.concatenate(pos), np.concatenate(counts), np.concatenate(hashes), weight
