"""A world of one: the store and the group a single rank talks to, in this process, without torch.

A run of one rank (`python -m spmd_dp`, or torchrun with one process) has no peer to reach, so it needs no
rendezvous and no gloo: `LocalStore` keeps the keys in a dict with c10d's semantics for the calls spmd_dp
makes (`add`, `set`, `get`, `multi_get`, `check`, `wait`; values read back as bytes; `get` and `wait` block
until the key is set, bounded by the store's timeout), and `LocalGroup`'s collectives return what the one
rank gave. Not importing torch saves ~1.5 s of CPU a run (most of a misconfigured run's time to its one line).
spmd_dp/control/comm.py chooses between these and the gloo ones (spmd_dp/control/gloo.py);
tests/test_local.py holds both stores to the same checks.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Union

Value = Union[str, bytes]


class LocalStore:
    """c10d's Store, in this process. `prefixed(p)` is a view whose keys are `p/key` (as c10d's PrefixStore)."""

    def __init__(self, timeout: timedelta = timedelta(seconds=300), _data: Optional[Dict[str, bytes]] = None,
                 _cond: Optional[threading.Condition] = None, _prefix: str = "") -> None:
        self.timeout = timeout
        self._data = {} if _data is None else _data
        self._cond = _cond or threading.Condition()
        self._prefix = _prefix

    def prefixed(self, prefix: str) -> "LocalStore":
        return LocalStore(self.timeout, self._data, self._cond, f"{self._prefix}{prefix}/")

    def set(self, key: str, value: Value) -> None:
        with self._cond:
            self._data[self._prefix + key] = value.encode() if isinstance(value, str) else bytes(value)
            self._cond.notify_all()

    def add(self, key: str, amount: int) -> int:
        with self._cond:
            k = self._prefix + key
            value = int(self._data.get(k, b"0")) + amount
            self._data[k] = str(value).encode()
            self._cond.notify_all()
            return value

    def check(self, keys: Sequence[str]) -> bool:
        with self._cond:
            return all(self._prefix + k in self._data for k in keys)

    def wait(self, keys: Sequence[str], timeout: Optional[timedelta] = None) -> None:
        """Until every key is set; RuntimeError after the timeout (the store's, unless given), as c10d's."""
        limit = (timeout or self.timeout).total_seconds()
        deadline = time.monotonic() + limit
        with self._cond:
            while not all(self._prefix + k in self._data for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"Wait timeout after {limit:g} s for keys {list(keys)}")
                self._cond.wait(left)

    def get(self, key: str) -> bytes:
        self.wait([key])
        with self._cond:
            return self._data[self._prefix + key]

    def multi_get(self, keys: Sequence[str]) -> List[bytes]:
        self.wait(keys)
        with self._cond:
            return [self._data[self._prefix + k] for k in keys]


class LocalGroup:
    """The collectives of a world of one: each returns what this rank gave. There is no peer to send to or
    watch (the control plane starts neither with one rank)."""

    rank, world, is_rank0 = 0, 1, True

    def all_gather_ints(self, values: Sequence[int]) -> List[List[int]]:
        return [list(values)]

    def min(self, value: float) -> float:
        return float(value)

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        return obj

    def broadcast_bytes(self, data: Optional[bytes], src: int = 0) -> bytes:
        return data or b""

    def all_gather_bytes(self, data: bytes) -> List[bytes]:
        return [data]

    def alltoall_bytes(self, chunks: Sequence[bytes]) -> List[bytes]:
        return list(chunks)

    def gather_bytes(self, data: bytes, dst: int = 0) -> List[bytes]:
        return [data]
