"""Durable, exactly-once commit of results on rank 0, resume, and the final file.

Under `${output_dir}`:
  `${name}.parts/part-NNNNNNNN.jsonl`  the batches received in one round, written
                                        atomically (temp file, fsync, rename);
  `${name}.journal.jsonl`              a header with the run's fingerprint, then one
                                        fsync'ed line per part naming its batches
                                        (record span, byte offset, length) and the
                                        records the engine refused (on_bad_record=skip).
A batch is committed once its journal line is on disk. A rerun with the same
output_dir reads the journal, skips the committed spans and finishes the rest; a
part with no journal line (a crash in between) is redone. When every record is
committed, `assemble` writes `${name}.jsonl` in input order (atomically) and
removes the parts, with `${name}.errors.jsonl` beside it when bad records were
skipped. A changed input or generation config is refused unless `overwrite=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from spmd_dp.errors import RunFailure, UsageError
from spmd_dp.log import logger

JOURNAL_VERSION = 1


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks) -> int:
    """Write chunks (bytes) to path via a temp file, fsync, rename. Returns the bytes written."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            n += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return n


class Journal:
    def __init__(self, output_dir: Path, name: str, fingerprint: Dict[str, Any], final_path: Path) -> None:
        self.dir = output_dir
        self.path = output_dir / f"{name}.journal.jsonl"
        self.parts = output_dir / f"{name}.parts"
        self.final_path = final_path
        self.fingerprint = fingerprint
        self.spans: Dict[int, Tuple[int, str, int, int]] = {}  # start -> (stop, part, offset, length)
        self.errors: List[Dict[str, Any]] = []  # records the engine refused, from the committed batches
        self.complete = False
        self._next_part = 0
        self._file = None

    # -- opening ------------------------------------------------------------------------------
    def open(self, overwrite: bool) -> None:
        """Load (or start) the journal; refuse a journal or output that belongs to another run."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._wipe()
        elif self.path.exists():
            self._load()
            if self.complete and not self.final_path.exists():
                logger.warning("%s is gone though the journal says it was complete; starting over", self.final_path)
                self._wipe()
                self.spans.clear()
                self.complete = False
        elif self.final_path.exists():
            raise UsageError(f"output error: {self.final_path} exists and no journal says it came from this "
                             f"input and config; set overwrite=true, or another output_dir or name")
        if not self.path.exists():
            self.parts.mkdir(parents=True, exist_ok=True)
            header = {"spmd_dp_journal": JOURNAL_VERSION, "fingerprint": self.fingerprint}
            atomic_write(self.path, [json.dumps(header).encode() + b"\n"])
        self.parts.mkdir(parents=True, exist_ok=True)
        self._remove_orphan_parts()
        self._file = open(self.path, "ab")

    def _wipe(self) -> None:
        for p in (self.path, self.final_path):
            if p.exists():
                p.unlink()
        shutil.rmtree(self.parts, ignore_errors=True)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
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
            raise UsageError(f"output error: {self.path} is not a spmd_dp journal; set overwrite=true or "
                             f"another output_dir")
        old = entries[0]["fingerprint"]
        if old != self.fingerprint:
            changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise UsageError(f"output error: {self.path} was written for a different run ({', '.join(changed)} "
                             f"changed); rerun with the same settings to resume, or set overwrite=true to start over")
        if good < os.path.getsize(self.path):  # a torn last line from a crash mid-append
            with open(self.path, "r+b") as f:
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
        for p in self.parts.iterdir():
            if p.name not in known:
                p.unlink()

    # -- committing ---------------------------------------------------------------------------
    def committed_spans(self) -> List[Tuple[int, int]]:
        return sorted((start, v[0]) for start, v in self.spans.items())

    def commit(self, batches: List[Dict[str, Any]]) -> None:
        """Commit batches (each with start, stop and its output `lines`) as one part: atomic, then journaled."""
        batches = [b for b in batches if b["start"] not in self.spans]  # exactly once
        if not batches:
            return
        name = f"part-{self._next_part:08d}.jsonl"
        self._next_part += 1
        entries, chunks, offset = [], [], 0
        for b in batches:
            data = "".join(line + "\n" for line in b["lines"]).encode()
            entries.append([b["start"], b["stop"], offset, len(data)])
            chunks.append(data)
            offset += len(data)
        errors = [err for b in batches for err in b.get("errors", [])]
        atomic_write(self.parts / name, chunks)
        self._append({"part": name, "batches": entries, **({"errors": errors} if errors else {})})
        self.errors += errors
        for start, stop, off, length in entries:
            self.spans[start] = (stop, name, off, length)

    def _append(self, entry: Dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(entry).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def missing(self, n_records: int) -> List[Tuple[int, int]]:
        from spmd_dp.work import pending_spans

        return pending_spans(n_records, self.committed_spans())

    # -- the final file -----------------------------------------------------------------------
    @property
    def errors_path(self) -> Path:
        return self.final_path.with_name(self.final_path.name.rsplit(".", 1)[0] + ".errors.jsonl")

    def write_errors(self, scan_errors: List[Dict[str, Any]]) -> int:
        """`${name}.errors.jsonl`: the bad records of the scan and those the engine refused, in input order."""
        rows = sorted(scan_errors + self.errors, key=lambda e: e["position"])
        atomic_write(self.errors_path, [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows])
        return len(rows)

    def assemble(self, n_records: int) -> int:
        """Write the final output in input order (atomically); returns its size in bytes."""
        missing = self.missing(n_records)
        if missing:
            raise RuntimeError(f"cannot assemble {self.final_path}: records {missing[:3]} are not committed")

        lines = 0

        def chunks():
            nonlocal lines
            for start in sorted(self.spans):
                _, part, offset, length = self.spans[start]
                with open(self.parts / part, "rb") as f:
                    f.seek(offset)
                    data = f.read(length)
                lines += data.count(b"\n")
                yield data

        if self.final_path.suffix == ".parquet":
            jsonl = self.parts / "final.jsonl"
            atomic_write(jsonl, chunks())
            size = jsonl_to_parquet(jsonl, self.final_path)
        else:
            size = atomic_write(self.final_path, chunks())
        self._append({"complete": True, "records": lines, "bytes": size})
        self.complete = True
        shutil.rmtree(self.parts, ignore_errors=True)
        logger.info("wrote %s (%d records, %.1f MB)", self.final_path, lines, size / 1e6)
        return size

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def jsonl_to_parquet(src: Path, dst: Path, rows_per_group: int = 8192) -> int:
    """Convert JSONL to Parquet (pyarrow), streaming: one pass to unify the schema, one to write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def groups():
        rows = []
        with open(src, "rb") as f:
            for line in f:
                rows.append(json.loads(line))
                if len(rows) == rows_per_group:
                    yield rows
                    rows = []
        if rows:
            yield rows

    try:
        # pa.array infers one struct type from every row's keys (Table.from_pylist would only look at the first)
        schema = pa.unify_schemas([pa.schema(list(pa.array(g).type)) for g in groups()],
                                  promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RunFailure(f"cannot write Parquet: the records' fields change type ({e}); use output_format=jsonl "
                         f"(the results are committed: rerun with output_format=jsonl)") from None
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with pq.ParquetWriter(tmp, schema) as writer:
        for g in groups():
            writer.write_table(pa.Table.from_pylist(g, schema=schema))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return dst.stat().st_size


def fingerprint(cfg, input_sha256: str, n_records: int, template: Optional[Path] = None) -> Dict[str, Any]:
    """What the committed results depend on: a resume with any of it changed is refused."""
    from dataclasses import asdict

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
    }
