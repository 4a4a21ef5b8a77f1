"""The duplicate-key check, partitioned by key hash: no rank holds every key.

While it scans, a rank keeps the valid keys of its pieces (`KeyList`: the key's bytes, the
record and line in the piece). Once the pieces are merged, each key is sent
with its global position and line to the rank that owns its hash (hash % world: all
copies of a key meet on one rank), in one all-to-all. The owner sorts what it received
by (hash, position) and compares the keys of equal hashes byte for byte: every later
copy of a key is a duplicate of the first. A rank holds about 1/world of the keys, ~40
bytes each plus the key, only during the check.
"""

from __future__ import annotations

from array import array
from typing import Dict, List, Sequence, Tuple

import numpy as np

from spmd_dp.inputs.records import key_hash

Duplicate = Tuple[int, int, int, int, bytes]  # (position, line, first position, first line, key bytes)


class KeyList:
    """The valid keys of one scanned piece, compactly: the keys' bytes (records.encode_key) end to end in one
    buffer, where each ends, and each one's record and line in the piece (~24 bytes a key, plus the key)."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.ends, self.records, self.lines = array("Q"), array("Q"), array("Q")

    def add(self, encoded: bytes, record: int, line: int) -> None:
        self.blob += encoded
        self.ends.append(len(self.blob))
        self.records.append(record)
        self.lines.append(line)

    def __len__(self) -> int:
        return len(self.ends)

    def views(self):
        """Each key as a memoryview of the buffer, in order."""
        mv = memoryview(self.blob)
        start = 0
        for end in self.ends:
            yield mv[start:end]
            start = end


def outgoing(keylists: Dict[int, KeyList], first: Dict[int, int], line_base: Dict[int, int], world: int
             ) -> List[bytes]:
    """One payload per rank: the keys whose hash it owns, with their global positions and lines.

    first[piece]: the piece's first record in the input; line_base[piece]: lines of the file before it."""
    pieces = [p for p, k in keylists.items() if len(k)]
    if not pieces:
        return [b""] * world
    n = sum(len(keylists[p]) for p in pieces)
    keys = [v for p in pieces for v in keylists[p].views()]
    h = np.fromiter((key_hash(v) for v in keys), dtype=np.uint64, count=n)
    pos = np.concatenate([np.frombuffer(keylists[p].records, dtype=np.uint64) + np.uint64(first[p]) for p in pieces])
    line = np.concatenate([np.frombuffer(keylists[p].lines, dtype=np.uint64) + np.uint64(line_base[p])
                           for p in pieces])
    lens = np.fromiter((len(v) for v in keys), dtype=np.uint64, count=n)
    owner = (h % np.uint64(world)).astype(np.int64)
    out = []
    for dst in range(world):
        sel = np.flatnonzero(owner == dst)
        if not len(sel):
            out.append(b"")
            continue
        head = np.array([len(sel)], dtype=np.uint64)
        out.append(b"".join([head.tobytes(), h[sel].tobytes(), pos[sel].tobytes(), line[sel].tobytes(),
                             lens[sel].tobytes(), *(keys[i] for i in sel)]))
    return out


def find_duplicates(payloads: Sequence[bytes]) -> List[Duplicate]:
    """Every later copy of a key among the payloads this rank received, naming the first copy."""
    hs, ps, ls, keys = [], [], [], []
    for data in payloads:
        if not data:
            continue
        n = int(np.frombuffer(data, dtype=np.uint64, count=1)[0])
        arrays = np.frombuffer(data, dtype=np.uint64, count=4 * n, offset=8).reshape(4, n)
        hs.append(arrays[0])
        ps.append(arrays[1])
        ls.append(arrays[2])
        blob = memoryview(data)[8 + 32 * n:]
        ends = np.cumsum(arrays[3])
        starts = ends - arrays[3]
        keys += [bytes(blob[int(a):int(b)]) for a, b in zip(starts, ends)]
    if not hs:
        return []
    h, pos, line = np.concatenate(hs), np.concatenate(ps), np.concatenate(ls)
    order = np.lexsort((pos, h))  # by hash, then by position
    sh = h[order]
    same = np.flatnonzero(sh[1:] == sh[:-1]) + 1  # sorted indices equal to the one before
    if not len(same):
        return []
    out: List[Duplicate] = []
    firsts: Dict[bytes, Tuple[int, int]] = {}
    run_hash = None
    for i in np.unique(np.concatenate([same - 1, same])):  # every member of a run of equal hashes, in order
        j = int(order[i])
        if sh[i] != run_hash:
            run_hash, firsts = sh[i], {}
        key = keys[j]
        if key in firsts:
            out.append((int(pos[j]), int(line[j]), *firsts[key], key))
        else:
            firsts[key] = (int(pos[j]), int(line[j]))
    return sorted(out)
