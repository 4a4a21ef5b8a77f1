"""A rank's share of the scan, in processes of its own, forked before the engine starts.

The scan is Python-bound (parsing, validation). In the rank's own process it would take
turns on the GIL with the engine starting in its thread (vLLM's start is Python-bound for
its first seconds: imports, configuration, the tokenizer) and delay it. So the rank forks
its scanners first, while it is a single thread with no engine and no CUDA, and hands them
its pieces once the file list is known: they validate and index while the engine starts,
in parallel with it and with each other (a rank with cores to spare runs several), and send
back what the scan in the rank's thread would have made. Forked, they share the record
spec (the prompt builder and its templates) as it is; what comes back over the pipe is
our own children's, never a peer's.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from spmd_dp.errors import RunFailure, UsageError
from spmd_dp.inputs.duplicates import KeyList
from spmd_dp.inputs.index import locator_to_json
from spmd_dp.inputs.prefixes import PrefixList

MAX_PROCESSES = 8


def scan_processes(device_kind: str, local_world_size: int) -> int:
    """Scanner processes for a rank: the cores it sees per rank of its node, less one for the rank itself,
    1 to 8. A rank whose engine runs on CPU cores (pinned to them) leaves them to the engine: one."""
    if device_kind == "cpu_engine":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_PROCESSES, cores // max(local_world_size, 1) - 1))


def _serve(conn, spec, offset_every: int, storage_options) -> None:
    """A scanner: one request (the files, its pieces), one answer, then gone (no exit handlers of the parent's)."""
    from spmd_dp.inputs.scan import _error_of, _scan_piece

    try:
        request = conn.recv()
        if request is not None:
            files, pieces = request
            out = []
            for i, piece in pieces:
                keys, bad = KeyList(), []
                r, prefixes = _scan_piece(piece, files[piece.file], spec, offset_every, keys, bad, storage_options)
                r["locator"] = locator_to_json(r["locator"])
                out.append((i, r, (bytes(keys.blob), keys.ends.tobytes(), keys.records.tobytes(),
                                   keys.lines.tobytes()), bad, prefixes.to_bytes() if prefixes is not None else None))
            conn.send(("ok", out, time.process_time()))
    except BaseException as e:  # the rank reports it, as the same line on every rank
        try:
            conn.send(("error", _error_of(e, -1)))
        except Exception:
            pass
    finally:
        conn.close()
        os._exit(0)


class Scanners:
    """Processes forked now that scan pieces later (`scan`); `close` ends any left."""

    def __init__(self, spec, offset_every: int, storage_options: Optional[Dict[str, Any]], processes: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.spec = spec
        self.conns, self.procs = [], []
        self.cpu_s = 0.0  # the scanners' CPU seconds
        for _ in range(max(1, processes)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, spec, offset_every, storage_options), name="spmd_dp-scan",
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def __len__(self) -> int:
        return len(self.procs)

    def scan(self, files: Sequence[Any], pieces: List[Tuple[int, Any]], rank: int
             ) -> List[Tuple[int, Dict[str, Any], KeyList, list, Optional[PrefixList]]]:
        """Scan pieces [(piece id, Piece)] (contiguous shares, balanced by bytes, over the processes):
        [(piece id, summary, KeyList, bad records, prefix keys or None)] in piece order."""
        from spmd_dp.inputs.scan import assign

        owners = assign([p for _, p in pieces], files, len(self.conns)) if pieces else []
        for k, conn in enumerate(self.conns):
            conn.send((list(files), [pieces[j] for j, o in enumerate(owners) if o == k]))
        out = []
        for k, conn in enumerate(self.conns):
            try:
                status, payload, *cpu = conn.recv()
            except EOFError:
                self.procs[k].join(5)
                raise RunFailure(f"a scanner process of rank {rank} died (exit code {self.procs[k].exitcode}); "
                                 f"it may have run out of memory") from None
            if status == "error":
                code, message = payload
                raise UsageError(message) if code == 2 else RunFailure(message.replace("rank -1", f"rank {rank}"))
            self.cpu_s += cpu[0] if cpu else 0.0
            for i, r, (blob, ends, records, lines), bad, prefixes in payload:
                keys = KeyList()
                keys.blob = bytearray(blob)
                keys.ends.frombytes(ends)
                keys.records.frombytes(records)
                keys.lines.frombytes(lines)
                out.append((i, r, keys, bad, None if prefixes is None else
                            PrefixList.from_bytes(self.spec.whole_key, prefixes)))
        return sorted(out, key=lambda x: x[0])

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)  # a scanner that got no request yet: nothing to do
            except (OSError, ValueError):
                pass
            conn.close()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.conns, self.procs = [], []
