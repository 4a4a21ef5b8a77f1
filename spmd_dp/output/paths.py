"""Every file a node's run writes under `output_dir`, named in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from spmd_dp.config import RunConfig


@dataclass(frozen=True)
class OutputPaths:
    """Every file a run writes under `output_dir` (absolute, `~` expanded): the one place they are named."""

    dir: Path
    final: Path  # ${name}.jsonl | ${name}.parquet
    metrics: Path  # ${name}.metrics.json
    config: Path  # ${name}.config.yaml: the resolved config
    journal: Path  # ${name}.journal.jsonl: what is committed (how a rerun resumes)
    parts: Path  # ${name}.parts/: committed batches until the final file is written
    errors: Path  # ${name}.errors.jsonl: skipped bad records (on_bad_record=skip)
    shards: Optional[Path] = None  # output_mode=sharded: ${name}/, the folder of shards (None: one file)
    name: str = ""

    # what the run says about itself (spmd_dp/status/, spmd_dp/preflight/)
    @property
    def status(self) -> Path:
        """${name}.status.json: rank 0's live status, rewritten every few seconds."""
        return self.dir / f"{self.name}.status.json"

    @property
    def events(self) -> Path:
        """${name}.events.jsonl: what happened on the ranks (engines ready, restarts, hand-backs, drains)."""
        return self.dir / f"{self.name}.events.jsonl"

    @property
    def timeline(self) -> Path:
        """${name}.timeline.png: the picture of the run."""
        return self.dir / f"{self.name}.timeline.png"

    @property
    def preflight(self) -> Path:
        """${name}.preflight.json: what preflight=true found (the only file it writes)."""
        return self.dir / f"{self.name}.preflight.json"

    @property
    def output(self) -> Path:
        """What the run produces: the folder of shards, or the one file."""
        return self.shards if self.shards is not None else self.final

    @property
    def manifest(self) -> Path:
        """The shard folder's manifest (a `_` name: pyarrow.dataset and datasets' folder readers skip it)."""
        assert self.shards is not None
        return self.shards / "_manifest.json"

    @classmethod
    def of(cls, cfg: RunConfig) -> "OutputPaths":
        return cls.named(cfg.output_dir, cfg.name, cfg.output_format, cfg.output_mode == "sharded" and not cfg.merge)

    @classmethod
    def named(cls, output_dir, n: str, output_format: str = "jsonl", shards: bool = False) -> "OutputPaths":
        """The paths of the run `n` in `output_dir` (also without its config: `python -m spmd_dp.status`)."""
        d = Path(output_dir).expanduser().resolve()
        return cls(d, d / f"{n}.{output_format}", d / f"{n}.metrics.json", d / f"{n}.config.yaml",
                   d / f"{n}.journal.jsonl", d / f"{n}.parts", d / f"{n}.errors.jsonl", d / n if shards else None, n)
