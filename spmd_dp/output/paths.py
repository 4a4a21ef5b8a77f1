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
        d = Path(cfg.output_dir).expanduser().resolve()
        n = cfg.name
        shards = d / n if cfg.output_mode == "sharded" and not cfg.merge else None
        return cls(d, d / f"{n}.{cfg.output_format}", d / f"{n}.metrics.json", d / f"{n}.config.yaml",
                   d / f"{n}.journal.jsonl", d / f"{n}.parts", d / f"{n}.errors.jsonl", shards)
