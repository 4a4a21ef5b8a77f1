"""The duplicate-key check, partitioned by key hash: no rank holds every key.

While it scans, a rank keeps the valid keys of its pieces (`KeyList`: the keys' bytes end to
end, and each one's record and line in its piece). Once the pieces are merged, each key is
sent with its global position and line to the rank that owns its hash (hash % world: all
copies of a key meet on one rank), in one all-to-all. The owner sorts what it received by
(hash, position) and compares the keys of equal hashes byte for byte: every later copy of a
key is a duplicate of the first. Keys travel as one buffer per rank pair, never as one
Python object each: a rank holds ~32 bytes per key it scanned or owns, plus the keys.
"""

from __future__ import annotations

from array import array
from typing import Dict, List, Sequence, Tuple

import numpy as np

from spmd_dp.inputs.records import key_hash

Duplicate = Tuple[int, int, int, int, bytes]  # (position, line, first position, first line, key bytes)
_U64 = np.dtype("<u8")


class KeyList:
    """The valid keys of one scanned piece: their bytes (records.encode_key) end to end, where each ends, and
    each one's record and line in the piece. The JSONL scan appends to these directly (a call per record
    costs more than the bookkeeping itself)."""

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


def _gather(blob: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> bytes:
    """The bytes of the keys [starts, starts + lens) end to end (a ragged gather in numpy)."""
    total = int(lens.sum())
    if not total:
        return b""
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
    return blob[np.arange(total, dtype=np.int64) + shift].tobytes()


def outgoing(keylists: Dict[int, KeyList], first: Dict[int, int], line_base: Dict[int, int], world: int
             ) -> List[bytes]:
    """One payload per rank: the keys whose hash it owns, with their global positions and lines.

    first[piece]: the piece's first record in the input; line_base[piece]: lines of its file before it.
    keylists is emptied. A payload is [n, hashes[n], positions[n], lines[n], key lengths[n]] (little-endian uint64), then the keys."""
    parts: List[List[Tuple[np.ndarray, ...]]] = [[] for _ in range(world)]
    for piece in list(keylists):
        kl = keylists.pop(piece)  # freed as it goes: the payloads take its place
        n = len(kl)
        if not n:
            continue
        blob = np.frombuffer(kl.blob, dtype=np.uint8)
        ends = np.frombuffer(kl.ends, dtype=np.uint64).astype(np.int64)
        starts = np.concatenate(([0], ends[:-1]))
        mv = memoryview(kl.blob)
        h = np.fromiter((key_hash(mv[a:b]) for a, b in zip(starts.tolist(), ends.tolist())), dtype=np.uint64,
                        count=n)
        pos = np.frombuffer(kl.records, dtype=np.uint64) + np.uint64(first[piece])
        line = np.frombuffer(kl.lines, dtype=np.uint64) + np.uint64(line_base[piece])
        owner = h % np.uint64(world)
        for dst in range(world):
            sel = np.flatnonzero(owner == dst) if world > 1 else np.arange(n)
            if len(sel):
                lens = ends[sel] - starts[sel]
                parts[dst].append((h[sel], pos[sel], line[sel], lens, _gather(blob, starts[sel], lens)))
        mv.release()
    out = []
    for dst in range(world):
        chunks, parts[dst] = parts[dst], []
        if not chunks:
            out.append(b"")
            continue
        n = sum(len(c[0]) for c in chunks)
        buf = bytearray(8 + 32 * n + sum(len(c[4]) for c in chunks))  # filled in place, chunk by chunk (freed)
        buf[:8] = np.array([n], dtype=_U64).tobytes()
        row, key_at = 0, 8 + 32 * n
        while chunks:
            c = chunks.pop(0)
            k = len(c[0])
            for i in range(4):  # column i of the payload, rows [row, row + k)
                at = 8 + 8 * (i * n + row)
                buf[at:at + 8 * k] = c[i].astype(_U64).tobytes()
            buf[key_at:key_at + len(c[4])] = c[4]
            row, key_at = row + k, key_at + len(c[4])
        out.append(buf)
    return out


def find_duplicates(payloads: Sequence[bytes]) -> List[Duplicate]:
    """Every later copy of a key among the payloads this rank received, naming the first copy."""
    cols, blobs = [], []
    for data in payloads:
        if data:
            n = int(np.frombuffer(data, dtype=_U64, count=1)[0])
            cols.append(np.frombuffer(data, dtype=_U64, count=4 * n, offset=8).reshape(4, n))
            blobs.append(memoryview(data)[8 + 32 * n:])
    if not cols:
        return []
    join = (lambda i: cols[0][i]) if len(cols) == 1 else (lambda i: np.concatenate([c[i] for c in cols]))
    h, pos = join(0), join(1)
    order = np.lexsort((pos, h))  # by hash, then by position
    sh = h[order]
    same = np.flatnonzero(sh[1:] == sh[:-1]) + 1  # sorted places equal to the one before
    if not len(same):
        return []
    line, lens = join(2), join(3).astype(np.int64)
    ends = np.concatenate([np.cumsum(c[3].astype(np.int64)) for c in cols])  # each key's end in its payload
    source = np.concatenate([np.full(c.shape[1], k, dtype=np.int32) for k, c in enumerate(cols)])
    out: List[Duplicate] = []
    firsts: Dict[bytes, Tuple[int, int]] = {}
    run_hash = None
    for i in np.unique(np.concatenate([same - 1, same])):  # every member of a run of equal hashes, in order
        j = int(order[i])
        if sh[i] != run_hash:
            run_hash, firsts = sh[i], {}
        key = bytes(blobs[source[j]][int(ends[j] - lens[j]):int(ends[j])])
        if key in firsts:
            out.append((int(pos[j]), int(line[j]), *firsts[key], key))
        else:
            firsts[key] = (int(pos[j]), int(line[j]))
    return sorted(out)
