"""The order records are generated in: input order, or grouped by prompt prefix (prefix affinity).

Every rank holds one `RecordOrder`: `perm[slot]` is the input position of the record generated in that slot (None:
slot = position), and `sharing[slot]` how many prefix levels (spmd_dp/inputs/prefixes.py) the record in that slot
shares with the one before it (None: no grouping). Batches, claims and the journal count slots
(spmd_dp/control/claims.py, spmd_dp/output/journal.py); rows carry their input positions, and the output is put
back in input order at the end (spmd_dp/output/final.py). Rank 0 builds it from every rank's keys (gathered), and
broadcasts it: it depends only on the input and the options, so a rerun builds the same one (its digest is in the
journal's fingerprint).

The grouped order is a trie over the levels: records are sorted by the first position of their level-0 group, then
of their level-1 group, ... then by position. Records that share nothing keep their input order, so an input
without shared prefixes gets the identity. `prefix_affinity=auto` keeps the grouped order only when it shares at
least `AUTO_GAIN` more of the prompts' bytes between neighbours than the input order does (else input order, still
with `sharing`, so that claims keep neighbours who share together); `true` keeps it whenever it differs.

What a reader would get wrong: a slot is not a position. A batch [start, stop) of slots holds the records at
positions perm[start:stop], scattered through the input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from spmd_dp.inputs.prefixes import level_weights, unpack

AUTO_GAIN = 0.10  # auto: the grouped order must share this much more of the prompts' bytes between neighbours


@dataclass
class RecordOrder:
    n: int
    perm: Optional[np.ndarray] = None  # slot -> input position; None: input order
    sharing: Optional[np.ndarray] = None  # uint8 per slot: levels shared with the slot before; None: no grouping
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def permuted(self) -> bool:
        return self.perm is not None

    @property
    def grouped(self) -> bool:
        return self.sharing is not None

    def positions(self, start: int, stop: int) -> List[int]:
        """The input positions of slots [start, stop)."""
        return list(range(start, stop)) if self.perm is None else self.perm[start:stop].tolist()

    def read(self, index, start: int, stop: int) -> List[Optional[Dict[str, Any]]]:
        """The records of slots [start, stop) in slot order (spmd_dp/inputs/index.py; None: a skipped bad record)."""
        if self.perm is None:
            return index.read(start, stop)
        wanted = self.perm[start:stop]
        ranked = np.argsort(wanted, kind="stable")
        records = index.read_positions(wanted[ranked].tolist())
        out: List[Optional[Dict[str, Any]]] = [None] * len(wanted)
        for k, i in enumerate(ranked.tolist()):
            out[i] = records[k]
        return out

    def digest(self) -> Optional[str]:
        """What a resume must find again (the journal's fingerprint): None for input order."""
        return None if self.perm is None else hashlib.sha256(self.perm.astype("<u8").tobytes()).hexdigest()

    def describe(self) -> str:
        s = self.stats
        if not s.get("keyed") or not s.get("levels"):
            return "input order (prefix_affinity=false)" if s.get("off") else \
                "input order (no two prompts share their first 256 bytes)"
        what = "grouped by prompt prefix" if self.permuted else "input order"
        return (f"{what}: {s['shared']:.0%} of the prompts' bytes shared with the record before (input order: "
                f"{s['input_shared']:.0%}); {s['groups']} groups of {s['grouped_records']} records, largest "
                f"{s['largest']}" + ("" if self.grouped else "; no grouping in the claims"))

    # -- the broadcast ------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        head = json.dumps({"n": self.n, "perm": self.perm is not None, "sharing": self.sharing is not None,
                           "stats": self.stats}).encode()
        perm = self.perm.astype("<u8").tobytes() if self.perm is not None else b""
        sharing = self.sharing.tobytes() if self.sharing is not None else b""
        return len(head).to_bytes(8, "little") + head + perm + sharing

    @classmethod
    def from_bytes(cls, data: bytes) -> "RecordOrder":
        size = int.from_bytes(data[:8], "little")
        head = json.loads(data[8:8 + size])
        n, at = head["n"], 8 + size
        perm = sharing = None
        if head["perm"]:
            perm = np.frombuffer(data, dtype="<u8", count=n, offset=at).astype(np.int64)
            at += 8 * n
        if head["sharing"]:
            sharing = np.frombuffer(data, dtype=np.uint8, count=n, offset=at).copy()
        return cls(n, perm, sharing, head["stats"])


def _first_of_groups(n: int, pos: np.ndarray, keys: np.ndarray) -> Optional[np.ndarray]:
    """Per position: the first position of its group (records with this key); its own where it has no key or
    shares it with none. None when no key is shared."""
    order = np.argsort(keys)  # (not stable: the first position of a group is found below)
    sk = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
    sizes = np.diff(np.append(starts, len(sk)))
    if not (sizes > 1).any():
        return None
    first = np.minimum.reduceat(pos[order], starts)
    out = np.arange(n, dtype=np.int64)
    member = np.repeat(sizes > 1, sizes)  # in key order: the record's group has another
    out[pos[order[member]]] = np.repeat(first, sizes)[member]
    return out


def build(n: int, payloads: List[bytes], whole: bool, mode: Any) -> RecordOrder:
    """Rank 0: the order from every rank's keys (spmd_dp/inputs/prefixes.py). mode: "auto", True, or "claims"
    (input order whatever it shares; the claims still keep neighbours who share together)."""
    pos, counts, hashes, weight = unpack(payloads)
    pos = pos.astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)[:-1])) if len(counts) else counts
    weights = level_weights(whole)
    depth = int(counts.max()) if len(counts) else 0

    def same_groups(i: int, sel: np.ndarray, prev: np.ndarray) -> bool:
        """Level i groups records as level i-1 did (a long document: most levels): every record of a shared
        level-(i-1) group reaches level i with its group's first record's hash. O(n), no sort."""
        members = np.flatnonzero(prev != np.arange(n))
        where = np.full(n, -1, dtype=np.int64)
        where[pos[sel]] = offsets[sel] + i
        mine, theirs = where[members], where[prev[members]]
        return bool((mine >= 0).all() and (theirs >= 0).all() and (hashes[mine] == hashes[theirs]).all())

    # the trie order: rank classes refined level by level by the first position of each record's group
    rank = np.zeros(n, dtype=np.int64)
    firsts: List[np.ndarray] = []  # kept for the sharing below (int32 when positions fit: 4 bytes a record a level)
    for i in range(depth):
        sel = np.flatnonzero(counts > i)
        if firsts and same_groups(i, sel, firsts[-1]):
            firsts.append(firsts[-1])
            continue
        first = _first_of_groups(n, pos[sel], hashes[offsets[sel] + i]) if len(sel) else None
        if first is None:
            break
        first = first.astype(np.int32) if n < 2 ** 31 else first
        firsts.append(first)
        order = np.lexsort((first, rank))
        r, f = rank[order], first[order]
        change = np.empty(n, dtype=bool)
        change[0] = True
        change[1:] = (r[1:] != r[:-1]) | (f[1:] != f[:-1])
        rank[order] = np.cumsum(change) - 1
    used = len(firsts)
    stats: Dict[str, Any] = {"keyed": int(len(pos)), "levels": used, "weight": int(weight)}
    if not used:
        stats.update(shared=0.0, input_shared=0.0, groups=0, grouped_records=0, largest=0)
        return RecordOrder(n, None, None, stats)
    perm = np.argsort(rank, kind="stable")
    # what neighbours share, in the grouped order and in input order
    sharing, input_sharing = np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8)
    for first in firsts:
        sharing[1:] += (first[perm[1:]] == first[perm[:-1]])
        input_sharing[1:] += (first[1:] == first[:-1])
    cum = np.concatenate(([0.0], np.cumsum(weights)))
    total = max(float(weight), 1.0)
    shared, input_shared = float(cum[sharing].sum()) / total, float(cum[input_sharing].sum()) / total
    identity = bool((perm == np.arange(n)).all())
    # mode "claims" (a compressed input, which cannot be read out of order cheaply): input order, grouped claims
    permute = not identity and mode != "claims" and (mode is True or shared - input_shared >= AUTO_GAIN)
    kept = sharing if permute else input_sharing
    group = kept > 0
    starts = np.flatnonzero(group[1:] & ~group[:-1]) + 1  # the second record of each group
    if group[0]:
        starts = np.concatenate(([0], starts))
    ends = np.flatnonzero(group[:-1] & ~group[1:]) + 1
    if group[-1]:
        ends = np.concatenate((ends, [n]))
    sizes = ends - starts + 1
    stats.update(shared=round(shared, 4), input_shared=round(input_shared, 4), groups=int(len(sizes)),
                 grouped_records=int(sizes.sum()), largest=int(sizes.max()) if len(sizes) else 0)
    grouped = permute or mode is True or input_shared >= AUTO_GAIN
    return RecordOrder(n, perm if permute else None, kept if grouped else None, stats)


def shared_order(group, n: int, payload: Optional[bytes], whole: bool, mode: Any) -> RecordOrder:
    """Every rank: its keys to rank 0 (payload; None: keys were not taken, prefix_affinity=false), rank 0 builds
    the order, every rank gets it. group: spmd_dp/control/comm.py's group."""
    if payload is None:
        return RecordOrder(n, stats={"keyed": 0, "off": True})
    gathered = group.gather_bytes(payload)
    data = None
    if group.is_rank0:
        try:
            data = b"\x00" + build(n, gathered, whole, mode).to_bytes()
        except Exception as e:  # every rank raises it
            data = b"\x01" + f"{type(e).__name__}: {e}".encode()
        del gathered
    data = group.broadcast_bytes(data)
    if data[:1] == b"\x01":
        raise RuntimeError(f"building the prefix order failed on rank 0: {data[1:].decode()}")
    return RecordOrder.from_bytes(data[1:])
