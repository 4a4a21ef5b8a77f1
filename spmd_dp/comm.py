"""The ranks' gloo groups, owned by spmd_dp and kept out of torch.distributed's global state.

spmd_dp never calls `init_process_group`: it talks to its peers through
`ProcessGroupGloo` objects of its own, made on the rendezvous store. So
`torch.distributed` stays uninitialised in a rank, and vLLM's engine and
tensor-parallel workers, whether forked or spawned, start a world of their own
instead of taking ours (the failure DESIGN.md describes: "shape '[-1, 1, 1, 1, 2]'
is invalid"). That is what lets vLLM fork its engine process (its default) instead of
spawning it, which re-imports torch and vLLM: measured ~17 s of every engine start on
an H200 host. Every operation is bounded by the group's timeout.

What travels is JSON or plain tensors: nothing received is ever unpickled.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, List

import torch
import torch.distributed as dist


class Group:
    def __init__(self, store, rank: int, world: int, timeout: timedelta) -> None:
        self.rank, self.world = rank, world
        self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)

    def all_gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.pg.allgather([out], [t]).wait()
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([t], opts).wait()

    def min(self, value: float) -> float:
        """The smallest value any rank holds (all-reduce MIN)."""
        t = torch.tensor([value], dtype=torch.float64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return float(t.item())

    def send_bytes(self, data: bytes, dst: int) -> None:
        self.pg.send([torch.frombuffer(bytearray(data), dtype=torch.uint8)], dst, 0).wait()

    def recv_bytes(self, size: int, src: int):
        """Start receiving `size` bytes from src; returns (buffer, work): wait() then buffer.numpy().tobytes()."""
        buf = torch.empty(size, dtype=torch.uint8)
        return buf, self.pg.recv([buf], src, 0)

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """Broadcast a JSON-able object from src."""
        data = json.dumps(obj).encode() if self.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self.broadcast(size, src)
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        else:
            buf = torch.empty(int(size), dtype=torch.uint8)
        if int(size):
            self.broadcast(buf, src)
        return obj if self.rank == src else json.loads(buf.numpy().tobytes())
