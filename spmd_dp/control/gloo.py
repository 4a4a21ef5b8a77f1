"""The only module that uses torch.distributed: the rendezvous store, spmd_dp's gloo groups, their collectives
(a world of more than one rank; spmd_dp/control/comm.py chooses, spmd_dp/control/local.py is a world of one).

spmd_dp never calls `init_process_group`: it talks to its peers through
`ProcessGroupGloo` objects of its own, made on the rendezvous store. So
`torch.distributed` stays uninitialised in a rank, and vLLM's engine and
tensor-parallel workers, whether forked or spawned, start a world of their own
instead of taking ours (otherwise tensor parallelism inside a rank fails: "shape '[-1, 1, 1, 1, 2]'
is invalid", docs/architecture.md). That is what lets vLLM fork its engine process (its default) instead of
spawning it, which re-imports torch and vLLM: measured ~17 s of every engine start on
an H200 host. Every operation is bounded by the group's timeout.

The store is also where ranks claim work: `store.add(key, 1)` is atomic across
the world (spmd_dp/control/claims.py uses it through that one method). What travels is
JSON or integers: nothing received is ever unpickled.
"""

from __future__ import annotations

import json
import resource
from datetime import timedelta
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from spmd_dp.plan import RankPlan


def rendezvous(plan: RankPlan, timeout: timedelta):
    """The rendezvous store, its keys namespaced by run and restart (it outlives a torchrun restart)."""
    env = plan.env
    raise_open_files_limit(env.world_size)
    store = dist.TCPStore(env.master_addr, env.master_port, world_size=env.world_size,
                          is_master=plan.hosts_store, timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(env.store_prefix, store)


def raise_open_files_limit(world: int) -> None:
    """A gloo connection is a socket: rank 0 holds one per rank that sends it messages, and the setup group one
    per peer. Raise this process's soft limit of open files to the hard one when the world could need more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2 * world + 256 and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def substore(store, prefix: str):
    """A namespace inside a store: one per workflow node, and per use inside it."""
    return dist.PrefixStore(prefix, store)


# tags of the point-to-point messages of the control group (spmd_dp/control/plane.py)
HEADER, PAYLOAD, WATCH, HELLO = 1, 2, 3, 4
LONG_WAIT = timedelta(days=30)  # a wait that ends when the peer speaks or its process is gone, not on a clock


class Group:
    """A gloo group of the world's ranks over `store`, with the few collectives spmd_dp needs.

    lazy: gloo connects a pair of ranks on its first use instead of every pair at the start (N - 1 sockets a
    rank, N^2 / 2 in all, each exchanged through the store): the control group's messages go to rank 0 and
    along a ring, so there a rank connects to two or three peers and rank 0 to each rank once."""

    def __init__(self, store, rank: int, world: int, timeout: timedelta, is_rank0: bool, lazy: bool = False) -> None:
        """is_rank0: the plan's answer (spmd_dp/plan.py), for the modules that act on it (the scan, the control plane)."""
        self.rank, self.world, self.is_rank0 = rank, world, is_rank0
        if lazy:
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_default_device(lazy_init=True)]
            opts._timeout = timeout
            self.pg = dist.ProcessGroupGloo(store, rank, world, opts)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)

    def all_gather_ints(self, values: Sequence[int]) -> List[List[int]]:
        """Every rank's vector of integers (all of the same length), indexed by rank."""
        t = torch.tensor(list(values), dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.pg.allgather([out], [t]).wait()
        return [x.tolist() for x in out]

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
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

    def send_bytes(self, data: bytes, dst: int, tag: int = 0) -> None:
        self.pg.send([torch.frombuffer(bytearray(data), dtype=torch.uint8)], dst, tag).wait()

    def recv_bytes(self, size: int, src: int, tag: int = 0) -> "Receive":
        """Start receiving `size` bytes from src; `.result()` waits and returns them."""
        buf = torch.empty(size, dtype=torch.uint8)
        return Receive(buf, self.pg.recv([buf], src, tag))

    # -- the control group's messages: any rank -> rank 0, and the watch along the ring ----------------------
    def send_message(self, data: bytes, flags: int, dst: int = 0) -> None:
        """A header (size, flags), then the bytes; each send bounded by the group's timeout."""
        self.pg.send([torch.tensor([len(data), flags], dtype=torch.int64)], dst, HEADER).wait()
        if data:
            self.send_bytes(data, dst, PAYLOAD)

    def recv_message(self) -> Tuple[int, bytes, int]:
        """The next message any rank sends this one: (source, bytes, flags), in each sender's order. It waits as
        long as it takes (a rank that is gone is seen by the watch on it, not here)."""
        header = torch.empty(2, dtype=torch.int64)
        work = self.pg.recv_anysource([header], HEADER)
        work.wait(LONG_WAIT)
        src = work._source_rank()
        size, flags = header.tolist()
        return src, self.recv_bytes(size, src, PAYLOAD).result() if size else b"", flags

    def hello(self, watcher: int, peer: int) -> None:
        """Connect the ring before the watch: a lazy group connects a pair of ranks on its first message, and the
        pair of a rank and the one it watches carries none until the goodbye. A watch on a pair never connected
        does not see its peer's process go (kill -9 of rank 2 of 3 left ranks 0 and 1 waiting, 5 runs in 8), so
        each rank says hello to its watcher and hears the hello of the rank it watches (bounded by the group's
        timeout)."""
        sent = self.pg.send([torch.zeros(1, dtype=torch.int64)], watcher, HELLO)
        self.pg.recv([torch.empty(1, dtype=torch.int64)], peer, HELLO).wait()
        sent.wait()

    def watch(self, peer: int) -> None:
        """Wait for `peer`'s goodbye; raises at once when its process is gone (gloo sees its connection close)."""
        self.pg.recv([torch.empty(1, dtype=torch.int64)], peer, WATCH).wait(LONG_WAIT)

    def goodbye(self, peer: int, timeout: timedelta) -> None:
        """Tell the rank that watches this one that it leaves on purpose (bounded: that rank may have left)."""
        self.pg.send([torch.zeros(1, dtype=torch.int64)], peer, WATCH).wait(timeout)

    def all_gather_bytes(self, data: bytes) -> List[bytes]:
        """Every rank's bytes (of any length), indexed by rank."""
        sizes = [row[0] for row in self.all_gather_ints([len(data)])]
        if not max(sizes):
            return [b""] * self.world
        buf = torch.zeros(max(sizes), dtype=torch.uint8)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        self.pg.allgather([out], [buf]).wait()
        return [t[:n].numpy().tobytes() for t, n in zip(out, sizes)]

    def alltoall_bytes(self, chunks: Sequence[bytes]) -> List[bytes]:
        """chunks[r] goes to rank r; returns what each rank sent this one, indexed by rank (gloo all-to-all)."""
        assert len(chunks) == self.world
        table = self.all_gather_ints([len(c) for c in chunks])  # table[src][dst]: bytes src sends dst
        incoming = [table[src][self.rank] for src in range(self.world)]
        data = bytearray().join(chunks)  # one copy, writable: the tensor shares it
        send = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        recv = torch.empty(sum(incoming), dtype=torch.uint8)
        self.pg.alltoall_base(recv, send, incoming, [len(c) for c in chunks], dist.AllToAllOptions()).wait()
        raw = recv.numpy().tobytes()
        out, pos = [], 0
        for n in incoming:
            out.append(raw[pos:pos + n])
            pos += n
        return out

    def gather_bytes(self, data: bytes, dst: int = 0) -> List[bytes]:
        """Every rank's bytes on dst (indexed by rank), point to point; [] on the other ranks."""
        sizes = [row[0] for row in self.all_gather_ints([len(data)])]
        if self.rank != dst:
            if data:
                self.send_bytes(data, dst)
            return []
        receives = {r: self.recv_bytes(sizes[r], r) for r in range(self.world) if r != dst and sizes[r]}
        return [data if r == dst else (receives[r].result() if r in receives else b"") for r in range(self.world)]

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """Broadcast a JSON-able object from src."""
        data = self.broadcast_bytes(json.dumps(obj).encode() if self.rank == src else None, src)
        return obj if self.rank == src else json.loads(data)

    def broadcast_bytes(self, data: Optional[bytes], src: int = 0) -> bytes:
        """Broadcast src's bytes (data: src's; ignored elsewhere)."""
        data = (data or b"") if self.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self._broadcast(size, src)
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        else:
            buf = torch.empty(int(size), dtype=torch.uint8)
        if int(size):
            self._broadcast(buf, src)
        return data if self.rank == src else buf.numpy().tobytes()


class Receive:
    def __init__(self, buf: torch.Tensor, work) -> None:
        self.buf, self.work = buf, work

    def result(self) -> bytes:
        self.work.wait()
        return self.buf.numpy().tobytes()
