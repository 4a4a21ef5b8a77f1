"""A node's output as one object, `Output`: built once per node from the config, asked by every other module.

It decides, in one place, what `output_mode` means: the paths, whether every rank writes its own parts
(sharded) or rank 0 writes what it receives (single), the check that every rank sees the folder, each
rank's `Sink` (where the generation loop puts a finished batch's rows), and the end (the final file, or
the shard folder with its manifest, or merge=true's one file).

A sink puts `BatchDone` messages in the rank's outbox, in the order the batches finished: single mode with
the rows as JSON lines (rank 0 writes them); sharded with only the metadata of the part the sink wrote,
on a thread of its own, so that no write (fsync, a slow shared filesystem) holds the engine's loop.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from spmd_dp.config import RunConfig
from spmd_dp.control.messages import BatchDone
from spmd_dp.output.files import json_line
from spmd_dp.output.final import assemble
from spmd_dp.output.journal import Journal
from spmd_dp.output.paths import OutputPaths
from spmd_dp.output.rows import float32_columns
from spmd_dp.output.shards import ShardWriter, finish_shards, mark_shared, shared_seen

Put = Callable[[BatchDone], None]


class Output:
    def __init__(self, cfg: RunConfig) -> None:
        self.paths = OutputPaths.of(cfg)
        self.sharded = cfg.output_mode == "sharded"  # the one place output_mode is read at run time
        self.format = cfg.output_format
        self.float32 = float32_columns(cfg.name)

    @property
    def path(self) -> Path:
        """What the node produces: the folder of shards, or the one file."""
        return self.paths.output

    # -- rank 0, opening ---------------------------------------------------------------------------------
    def journal(self, fingerprint: Dict[str, Any]) -> Journal:
        return Journal(self.paths, fingerprint)

    def share(self) -> Optional[str]:
        """Sharded: leave a marker in the parts folder (the token every rank looks for); single: None."""
        return mark_shared(self.paths.parts) if self.sharded else None

    # -- every rank --------------------------------------------------------------------------------------
    def check_shared(self, group, token: Optional[str]) -> Optional[str]:
        """Sharded: does every rank see rank 0's marker (`group`: all ranks)? The error line if not, else None."""
        if token is None:
            return None
        seen = group.all_gather_bytes(b"1" if shared_seen(self.paths.parts, token) else b"0")
        blind = [r for r, x in enumerate(seen) if x != b"1"]
        if not blind:
            return None
        return (f"output error: output_mode=sharded: ranks {blind} do not see {self.paths.parts}, where rank 0 "
                f"writes: output_dir must be on a filesystem every rank shares (or use output_mode=single: rank 0 "
                f"writes everything)")

    def sink(self, rank: int, put: Put) -> "Sink":
        """Where this rank's generation loop puts finished batches; `put`: the rank's outbox."""
        if self.sharded:
            return ShardSink(ShardWriter(self.paths.parts, self.format, rank, self.float32), put)
        return Sink(put)

    # -- rank 0, the end ---------------------------------------------------------------------------------
    def finish(self, journal: Journal, n_records: int) -> int:
        """Every record is committed: the final file (or the shard folder and its manifest). Its size in bytes."""
        if self.paths.shards is not None:
            return finish_shards(journal, self.format)[1]
        return assemble(journal, n_records, self.float32)  # single, or sharded with merge=true


class Sink:
    """output_mode=single: the rows go to rank 0 as JSON lines, in the batch's message."""

    def __init__(self, put: Put) -> None:
        self.put_message = put

    def put(self, done: BatchDone, rows: List[Dict[str, Any]]) -> None:
        self.put_message(replace(done, lines=[json_line(r) for r in rows]))

    def check(self) -> None:
        """Raise what went wrong writing (nothing can, here)."""

    def close(self) -> None:
        """Every batch put is in the outbox."""


class ShardSink(Sink):
    """output_mode=sharded: each batch's rows become a part on disk, written on the sink's thread; its metadata
    goes to rank 0."""

    def __init__(self, writer: ShardWriter, put: Put) -> None:
        super().__init__(put)
        self.writer = writer
        self.todo: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="spmd_dp-shard-writer", daemon=True)
        self.thread.start()

    def put(self, done: BatchDone, rows: List[Dict[str, Any]]) -> None:
        self.check()
        self.todo.put((done, rows))

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            done, rows = item
            try:
                if self.error is None:
                    self.put_message(replace(done, part=self.writer.write(done.start, done.stop, rows)))
            except BaseException as e:  # raised in the loop's thread (check, close)
                self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.thread.is_alive():
            self.todo.put(None)
            self.thread.join()
        self.check()
