"""Durable, exactly-once commit on rank 0, and resume.

Under `${output_dir}` (the paths are `OutputPaths`, spmd_dp/plan.py):
  `${name}.parts/part-NNNNNNNN.jsonl`  the batches received in one round, written
                                        atomically (temp file, fsync, rename);
  `${name}.journal.jsonl`              a header with the run's fingerprint, then one
                                        fsync'ed line per part naming its batches
                                        (record span, byte offset, length) and the
                                        records the engine refused (on_bad_record=skip).
A batch is committed once its journal line is on disk. A rerun with the same
output_dir reads the journal, skips the committed spans and finishes the rest; a
part with no journal line (a crash in between) is removed and its batches redone.
When the final file is written (spmd_dp/output.py) the journal says so, and a
rerun finds the run complete. A changed input or generation config is refused
unless `overwrite=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from spmd_dp.batches import Span, pending_spans
from spmd_dp.errors import UsageError
from spmd_dp.log import logger
from spmd_dp.messages import BatchDone
from spmd_dp.output import atomic_write

JOURNAL_VERSION = 1


class Journal:
    def __init__(self, paths, fingerprint: Dict[str, Any]) -> None:
        """paths: the run's OutputPaths; fingerprint: what the committed results depend on."""
        self.paths = paths
        self.fingerprint = fingerprint
        self.spans: Dict[int, Tuple[int, str, int, int]] = {}  # start -> (stop, part, offset, length)
        self.errors: List[Dict[str, Any]] = []  # records the engine refused, from the committed batches
        self.complete = False
        self._next_part = 0
        self._file = None

    # -- opening ------------------------------------------------------------------------------
    def open(self, overwrite: bool) -> None:
        """Load (or start) the journal; refuse a journal or output that belongs to another run."""
        p = self.paths
        p.dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._wipe()
        elif p.journal.exists():
            self._load()
            if self.complete and not p.final.exists():
                logger.warning("%s is gone though the journal says it was complete; starting over", p.final)
                self._wipe()
                self.spans.clear()
                self.complete = False
        elif p.final.exists():
            raise UsageError(f"output error: {p.final} exists and no journal says it came from this "
                             f"input and config; set overwrite=true, or another output_dir or name")
        if not p.journal.exists():
            header = {"spmd_dp_journal": JOURNAL_VERSION, "fingerprint": self.fingerprint}
            atomic_write(p.journal, [json.dumps(header).encode() + b"\n"])
        p.parts.mkdir(parents=True, exist_ok=True)
        self._remove_orphan_parts()
        self._file = open(p.journal, "ab")

    def _wipe(self) -> None:
        for path in (self.paths.journal, self.paths.final):
            if path.exists():
                path.unlink()
        shutil.rmtree(self.paths.parts, ignore_errors=True)

    def _load(self) -> None:
        path = self.paths.journal
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        good = 0  # bytes of complete, valid lines
        entries = []
        for raw in lines[:-1]:  # the last element is after the final newline (or a torn line)
            try:
                entries.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            good += len(raw) + 1
        if not entries or entries[0].get("spmd_dp_journal") != JOURNAL_VERSION:
            raise UsageError(f"output error: {path} is not a spmd_dp journal; set overwrite=true or "
                             f"another output_dir")
        old = entries[0]["fingerprint"]
        if old != self.fingerprint:
            changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise UsageError(f"output error: {path} was written for a different run ({', '.join(changed)} "
                             f"changed); rerun with the same settings to resume, or set overwrite=true to start over")
        if good < os.path.getsize(path):  # a torn last line from a crash mid-append
            with open(path, "r+b") as f:
                f.truncate(good)
        for e in entries[1:]:
            if e.get("complete"):
                self.complete = True
            for start, stop, offset, length in e.get("batches", []):
                self.spans[start] = (stop, e["part"], offset, length)
            self.errors += e.get("errors", [])
            if "part" in e:
                self._next_part = max(self._next_part, int(e["part"].split("-")[1].split(".")[0]) + 1)

    def _remove_orphan_parts(self) -> None:
        known = {part for (_, part, _, _) in self.spans.values()}
        for p in self.paths.parts.iterdir():
            if p.name not in known:
                p.unlink()

    # -- committing ---------------------------------------------------------------------------
    def committed_spans(self) -> List[Span]:
        return sorted((start, v[0]) for start, v in self.spans.items())

    def committed(self) -> Iterator[Tuple[int, int, str, int, int]]:
        """(start, stop, part, offset, length) of every committed batch, in input order."""
        for start in sorted(self.spans):
            yield (start, *self.spans[start])

    def commit(self, batches: List[BatchDone]) -> None:
        """Commit batches as one part: atomic, then journaled. A batch delivered twice is committed once."""
        batches = [b for b in batches if b.start not in self.spans]
        if not batches:
            return
        name = f"part-{self._next_part:08d}.jsonl"
        self._next_part += 1
        entries, chunks, offset = [], [], 0
        for b in batches:
            data = "".join(line + "\n" for line in b.lines).encode()
            entries.append([b.start, b.stop, offset, len(data)])
            chunks.append(data)
            offset += len(data)
        errors = [err for b in batches for err in b.errors]
        atomic_write(self.paths.parts / name, chunks)
        self._append({"part": name, "batches": entries, **({"errors": errors} if errors else {})})
        self.errors += errors
        for start, stop, off, length in entries:
            self.spans[start] = (stop, name, off, length)

    def _append(self, entry: Dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(entry).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def missing(self, n_records: int) -> List[Span]:
        return pending_spans(n_records, self.committed_spans())

    def mark_complete(self, records: int, nbytes: int) -> None:
        """The final file is written: a rerun finds the run complete."""
        self._append({"complete": True, "records": records, "bytes": nbytes})
        self.complete = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def fingerprint(cfg, input_sha256: str, n_records: int, template: Optional[Path] = None) -> Dict[str, Any]:
    """What the committed results depend on: a resume with any of it changed is refused."""
    return {
        "template_sha256": hashlib.sha256(template.read_bytes()).hexdigest() if template else None,
        "chat": cfg.chat,
        "system_prompt": cfg.system_prompt,
        "messages_field": cfg.messages_field,
        "input_sha256": input_sha256,
        "n_records": n_records,
        "model_name": cfg.model_name,
        "inference_engine": cfg.inference_engine,
        "generation_options": asdict(cfg.generation_options),
        "generation_options_per_rank": cfg.generation_options_per_rank,
        "prompt_field": cfg.prompt_field,
        "primary_key": cfg.primary_key,
        "output_format": cfg.output_format,
        # per-record requests (spmd_dp/requests.py): what changes the results
        "task": cfg.task,
        "input_format": cfg.input_format,
        "return_token_ids": cfg.return_token_ids,
        "lora_adapters": dict(cfg.engine_options.lora_adapters),
        "lora_adapter": cfg.lora_adapter,
        "pooling_options": dict(cfg.pooling_options),
        "document_field": cfg.document_field,
        "on_long_prompt": cfg.on_long_prompt,
        "clamp_max_tokens": cfg.clamp_max_tokens,
        "max_model_len": cfg.engine_options.max_model_len,
    }
