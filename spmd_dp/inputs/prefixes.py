"""A record's prefix key, taken while the input is scanned: hashes of its prompt's leading bytes at a ladder of lengths.

`LEVELS` are prefix lengths in bytes (256, 512, 768, 1 KiB, then x1.5 / x1.33 up to 256 KiB): a record gets a hash
(xxh3-64) of each prefix its prompt reaches; two records with equal hashes at a level share at least that many
leading bytes. 256 bytes (~64 tokens, four of vLLM's 16-token KV blocks) is the least sharing worth moving a record
for: a shorter prompt has no key. A ladder, not one length, because the length that groups records is not known
before all are seen (a system prompt shared by all, then a document shared by a few: the order is a trie over the
levels, spmd_dp/inputs/order.py). With `prefix_field` the key is the field's whole value (one level).

What a reader would get wrong: the key is of the prompt before the chat template and the tokenizer (the engine's,
which the scan must not wait for): records whose prompts share leading characters share leading tokens under one
template (all but the token at the boundary).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Dict, List, Tuple

import numpy as np
import xxhash

LEVELS = (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536,
          98304, 131072, 196608, 262144)
_hash = xxhash.xxh3_64_intdigest
_U64 = np.dtype("<u8")


def level_weights(whole: bool) -> np.ndarray:
    """The bytes each level adds to what two records share (prefix_field: 1 for its one level)."""
    if whole:
        return np.ones(1, dtype=np.float64)
    return np.diff(np.array((0,) + LEVELS, dtype=np.float64))


class PrefixList:
    """The prefix keys of one scanned piece: each keyed record's number in the piece, its count of levels, the
    hashes end to end; and the weight of every valid record (its prompt's bytes; prefix_field: 1)."""

    def __init__(self, whole: bool = False) -> None:
        self.whole = whole
        self.records, self.counts, self.hashes = array("Q"), array("B"), array("Q")
        self.weight = 0

    def add(self, record: int, data) -> None:
        """Record `record` of the piece, whose key is taken from `data` (bytes, or None: it has no key)."""
        if data is None:
            return
        if self.whole:
            self.weight += 1
            self.records.append(record)
            self.counts.append(1)
            self.hashes.append(_hash(data))
            return
        n = len(data)
        self.weight += n
        k = bisect_right(LEVELS, n)
        if not k:
            return
        mv = memoryview(data)
        self.records.append(record)
        self.counts.append(k)
        self.hashes.extend([_hash(mv[:length]) for length in LEVELS[:k]])

    def __len__(self) -> int:
        return len(self.records)

    def to_bytes(self) -> Tuple[bytes, bytes, bytes, int]:
        """What a scanner process sends back (its pipe pickles bytes, not arrays)."""
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
