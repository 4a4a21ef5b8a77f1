"""Is `model_name` one spmd_dp can start? Checked on every rank before anything starts (exit 2, one line)."""

from __future__ import annotations

from pathlib import Path

from spmd_dp.config import RunConfig
from spmd_dp.errors import UsageError
from spmd_dp.models.embedded import is_embedded


def check_model(cfg: RunConfig) -> None:
    """Checks on the local machine that need no process group (every rank runs them)."""
    if cfg.inference_engine == "vllm_dp" and not is_embedded(cfg.model_name):
        looks_local = cfg.model_name.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(cfg.model_name).expanduser().exists():
            raise UsageError(f"config error: model_name={cfg.model_name!r} is a path that does not exist; "
                             f"give an existing model folder or a hub id")
