"""Durable, exactly-once commit on rank 0, and resume.

Under `${output_dir}` (the paths are `OutputPaths`, spmd_dp/output/paths.py):
  `${name}.parts/part-NNNNNNNN.jsonl`  output_mode=single: the batches received in one
                                        round, written atomically (temp file, fsync, rename);
                                        sharded: each rank's parts, one per batch
                                        (spmd_dp/output/shards.py), written by the rank itself;
  `${name}.journal.jsonl`              a header with the run's fingerprint, then one
                                        fsync'ed line per round naming its batches
                                        (span of slots, part, byte offset and length; for a
                                        shard its size, CRC-32 and rows; with prefix affinity
                                        the input positions of its lines) and the records
                                        the engine refused (on_bad_record=skip).
A batch is committed once its journal line is on disk. Exactly-once is decided here:
a batch delivered twice is journaled once, and the second delivery's shard removed. A rerun with the same
output_dir reads the journal, skips the committed spans and finishes the rest; a
part with no journal line (a crash in between) is removed and its batches redone.
When the final file is written (spmd_dp/output/files.py) the journal says so, and a
rerun finds the run complete (rank 0 reads that before any engine starts: `said_complete`), and leaves the
folder as it is. A changed input or generation config is refused unless `overwrite=true`, once something is
committed: a journal with nothing committed (a first run that failed) binds no one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from spmd_dp.control.claims import Span, pending_spans
from spmd_dp.errors import UsageError
from spmd_dp.log import logger
from spmd_dp.control.messages import BatchDone
from spmd_dp.output.files import atomic_write

JOURNAL_VERSION = 1


class Journal:
    def __init__(self, paths, fingerprint: Dict[str, Any]) -> None:
        """paths: the run's OutputPaths; fingerprint: what the committed results depend on."""
        self.paths = paths
        self.fingerprint = fingerprint
        self.spans: Dict[int, Tuple[int, Optional[str], int, int]] = {}  # start -> (stop, part, offset, length)
        self.shard_info: Dict[int, Tuple[int, int, Optional[str]]] = {}  # sharded: start -> (crc32, rows, schema)
        self.positions: Dict[int, List[int]] = {}  # prefix affinity: start -> its lines' input positions
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
            if self.complete and not p.output.exists():
                logger.warning("%s is gone though the journal says it was complete; starting over", p.output)
                self._wipe()
                self.spans.clear()
                self.shard_info.clear()
                self.complete = False
            elif not self.complete and p.shards is not None and p.shards.exists() and not p.parts.exists():
                # the end of a sharded run renames the parts' folder, then journals it complete: a crash in between
                logger.info("%s was renamed but not journaled complete: taking its shards back", p.shards)
                os.replace(p.shards, p.parts)
        elif p.output.exists():
            raise UsageError(f"output error: {p.output} exists and no journal says it came from this "
                             f"input and config; set overwrite=true, or another output_dir or name")
        if self.complete:
            return  # nothing to commit: the folder is left as it is
        if not p.journal.exists():
            self._write_header()
        p.parts.mkdir(parents=True, exist_ok=True)
        self._remove_orphan_parts()
        self._file = open(p.journal, "ab")

    def _write_header(self) -> None:
        header = {"spmd_dp_journal": JOURNAL_VERSION, "fingerprint": self.fingerprint}
        atomic_write(self.paths.journal, [json.dumps(header).encode() + b"\n"])

    def _wipe(self) -> None:
        for path in (self.paths.journal, self.paths.final):
            if path.exists():
                path.unlink()
        shutil.rmtree(self.paths.parts, ignore_errors=True)
        if self.paths.shards is not None:
            shutil.rmtree(self.paths.shards, ignore_errors=True)

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
            if len(entries) == 1:  # nothing was committed (a run that failed first): the folder is not bound yet
                logger.info("%s had nothing committed: it now belongs to this run (%s changed)", path,
                            ", ".join(changed))
                self._write_header()
                return
            raise UsageError(f"output error: {path} was written for a different run ({', '.join(changed)} "
                             f"changed); rerun with the same settings to resume, or set overwrite=true to start over")
        if good < os.path.getsize(path):  # a torn last line from a crash mid-append
            with open(path, "r+b") as f:
                f.truncate(good)
        for e in entries[1:]:
            if e.get("complete"):
                self.complete = True
            for start, stop, offset, length, *positions in e.get("batches", []):
                self.spans[start] = (stop, e["part"], offset, length)
                if positions:
                    self.positions[start] = positions[0]
            for start, stop, part, size, crc32, rows, schema, *positions in e.get("shards", []):
                self.spans[start] = (stop, part, 0, size)
                self.shard_info[start] = (crc32, rows, schema)
                if positions:
                    self.positions[start] = positions[0]
            self.errors += e.get("errors", [])
            if "part" in e:
                self._next_part = max(self._next_part, int(e["part"].split("-")[1].split(".")[0]) + 1)

    def _remove_orphan_parts(self) -> None:
        """A part no journal line names is not output (its batch is redone): written before a crash, or by a rank
        whose message never reached rank 0."""
        known = {part for (_, part, _, _) in self.spans.values()}
        orphans = [p for p in self.paths.parts.iterdir() if p.name not in known]
        for p in orphans:
            p.unlink()
        orphans = [p for p in orphans if p.name.startswith("part-")]  # (not temp files, markers)
        if orphans:
            logger.info("removed %d parts no journal line names (written before the last run stopped): %s%s",
                        len(orphans), ", ".join(p.name for p in orphans[:3]), ", ..." if len(orphans) > 3 else "")

    # -- committing ---------------------------------------------------------------------------
    def committed_spans(self) -> List[Span]:
        return sorted((start, v[0]) for start, v in self.spans.items())

    def committed(self) -> Iterator[Tuple[int, int, str, int, int]]:
        """(start, stop, part, offset, length) of every committed batch, in input order."""
        for start in sorted(self.spans):
            yield (start, *self.spans[start])

    def commit(self, batches: List[BatchDone]) -> int:
        """Commit batches as one part: atomic, then journaled. A batch delivered twice is committed once.
        Batches that carry a part (output_mode=sharded: their ranks wrote them) are journaled as they are.
        Returns how many batches were new."""
        if any(b.part is not None for b in batches):
            return self._commit_shards(batches)
        batches = [b for b in batches if b.start not in self.spans]
        if not batches:
            return 0
        name = f"part-{self._next_part:08d}.jsonl"
        self._next_part += 1
        entries, chunks, offset = [], [], 0
        for b in batches:
            data = "".join(line + "\n" for line in b.lines).encode()
            entries.append([b.start, b.stop, offset, len(data)] + ([b.positions] if b.positions is not None else []))
            chunks.append(data)
            offset += len(data)
        errors = [err for b in batches for err in b.errors]
        atomic_write(self.paths.parts / name, chunks)
        self._append({"part": name, "batches": entries, **({"errors": errors} if errors else {}), **timing(batches)})
        self.errors += errors
        for start, stop, off, length, *positions in entries:
            self.spans[start] = (stop, name, off, length)
            if positions:
                self.positions[start] = positions[0]
        return len(entries)

    def _commit_shards(self, batches: List[BatchDone]) -> int:
        """One journal line (one fsync) for a round of shards. The first delivery of a batch wins; the shard of a
        second one is removed: a part that is not in the journal is not output."""
        entries, errors, new = [], [], []
        for b in batches:
            part = b.part or {}
            if b.start in self.spans:
                name = part.get("name")
                if name and name != self.spans[b.start][1]:
                    (self.paths.parts / name).unlink(missing_ok=True)
                    logger.info("batch %d (records %d..%d) came twice (from rank %d too): its second shard %s is "
                                "removed", b.index, b.start, b.stop - 1, b.rank, name)
                continue
            entry = [b.start, b.stop, part.get("name"), part.get("bytes", 0), part.get("crc32", 0),
                     part.get("rows", 0), part.get("schema")] + ([b.positions] if b.positions is not None else [])
            entries.append(entry)
            new.append(b)
            errors += b.errors
            self.spans[b.start] = (b.stop, entry[2], 0, entry[3])
            self.shard_info[b.start] = (entry[4], entry[5], entry[6])
            if b.positions is not None:
                self.positions[b.start] = b.positions
        if entries:
            self._append({"shards": entries, **({"errors": errors} if errors else {}), **timing(new)})
            self.errors += errors
        return len(entries)

    def shards(self) -> Iterator[Tuple[int, int, Optional[str], int, int, int, Optional[str]]]:
        """(start, stop, part, bytes, crc32, rows, schema) of every committed shard, in input order."""
        for start in sorted(self.spans):
            stop, part, _, size = self.spans[start]
            yield (start, stop, part, size, *self.shard_info.get(start, (0, 0, None)))

    def positions_of(self, start: int) -> Optional[List[int]]:
        """The input positions of the lines (rows) of the batch committed at slot `start`; None: records
        [start, stop) in input order (no prefix affinity)."""
        return self.positions.get(start)

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


def timing(batches: List[BatchDone]) -> Dict[str, Any]:
    """What a journal line keeps for the timeline (spmd_dp/status/timeline.py), beside its batches and in their order:
    when it was committed, and each batch's [index, rank, claimed_unix, output_tokens]."""
    return {"t": round(time.time(), 3),
            "timing": [[b.index, b.rank, b.claimed_unix, b.output_tokens] for b in batches]}


def read_entries(path: Path) -> List[Dict[str, Any]]:
    """A journal's lines, read only (the header first; a torn last line left out): for the status and the timeline."""
    out = []
    with open(path, "rb") as f:
        for raw in f.read().split(b"\n")[:-1]:
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                break
    return out


def said_complete(paths) -> bool:
    """Does the journal end by saying the output is written, and is it there? Read before any engine starts (its
    last line only); whether it was written for this run is decided when the journal is opened on the scanned
    input (`Journal.open`)."""
    try:
        with open(paths.journal, "rb") as f:
            f.seek(max(0, os.path.getsize(paths.journal) - 4096))
            last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return bool(json.loads(last).get("complete")) and paths.output.exists()
    except (OSError, ValueError, AttributeError):  # no journal, a torn or foreign last line
        return False


def fingerprint(cfg, input_sha256: str, n_records: int, template: Optional[Path] = None,
                record_order: Optional[str] = None) -> Dict[str, Any]:
    """What the committed results depend on: a resume with any of it changed is refused. record_order: the digest
    of the order records are generated in (spmd_dp/inputs/order.py; None: input order): the journal counts its
    slots, so a resume must find the same one. The grouping's keys are left out at their defaults (a journal
    written before them resumes when its records are in input order)."""
    grouping = {"prefix_affinity": cfg.prefix_affinity, "prefix_field": cfg.prefix_field, "record_order": record_order}
    defaults = {"prefix_affinity": "auto", "prefix_field": None, "record_order": None}
    return {
        **{k: v for k, v in grouping.items() if v != defaults[k]},
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
        "output_mode": cfg.output_mode,  # rank 0's parts (several batches each) are no shards
        # per-record requests (spmd_dp/prompting/options.py): what changes the results
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
        # images (spmd_dp/prompting/images.py): the field they are read from (only when set: older journals agree)
        **({"image_field": cfg.image_field} if cfg.image_field else {}),
    }
