"""vLLM's and torch's known-harmless warnings, kept off the screen at the default log level: each is listed with why
it is harmless here, and comes back with VLLM_LOGGING_LEVEL=INFO (or any level but WARNING) or log_level=DEBUG.

vLLM logs from the rank and from its engine processes (EngineCore, workers), which run none of spmd_dp's code: they
are reached only through their environment. So, before vLLM is first imported in the rank:
  - vLLM's logging: VLLM_LOGGING_CONFIG_PATH, vLLM's own default config (its format, level and stream) plus a
    filter (`KnownHarmless`) on its handler, which every vLLM process applies when it configures its logging;
  - one line vLLM logs at import, before that (Triton without a CPU backend): a filter on its logger, in the rank
    (the engine processes still print it once each: nothing of ours runs there before it);
  - a FutureWarning of torch's that vLLM's import triggers: PYTHONWARNINGS (and the rank's own warnings filter);
  - CPU engines: torch's C++ warnings (the NUMA binding notice) by TORCH_CPP_LOG_LEVEL=ERROR, unless set.
What a reader would get wrong: nothing here lowers vLLM's level; an unknown warning or any error still shows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

# (the start of the message, why it is harmless under spmd_dp)
KNOWN_HARMLESS = (
    ("Enforce eager set, disabling torch.compile", "spmd_dp sets enforce_eager on CPU: vLLM CPU 0.32 cannot reload "
                                                   "its compile cache, compiling costs 20-60 s a start"),
    ("Inductor compilation was disabled by user settings", "follows from enforce_eager"),
    ("Model Runner V2 requires Triton", "vLLM CPU runs its V1 model runner"),
    ("Triton is not installed. triton-cpu is expected", "the CPU build of vLLM, without triton-cpu"),
    ("Triton is installed, but doesn't include CPU backend", "the CUDA Triton xgrammar installs, unused on CPU"),
    ("Reset SSM cache type to float32", "a Mamba models' setting, printed for every model"),
    ("libtcmalloc is not found in LD_PRELOAD", "a speed tip for CPU serving (docs.vllm.ai: set LD_PRELOAD)"),
    ("libiomp is not found in LD_PRELOAD", "the same"),
    ("[shutdown] Process manager: force killing remaining process", "an engine closed at the end of its work (or "
                                                                    "a restart): its processes are ended"),
    ("[shutdown] force killing sub process", "the same"),
    ("[shutdown] Executor: workers still running after grace period", "the same"),
)
IMPORT_TIME = ("vllm.triton_utils.importing",)  # loggers that speak at import, before vLLM's logging is configured
TORCH_FUTURE_WARNING = "`torch.distributed.reduce_op` is deprecated"  # vLLM's import walks torch's attributes

_config_path: Optional[str] = None  # the config file this process made (a second engine reuses it)


class KnownHarmless(logging.Filter):
    """Drops the records whose message starts as one of KNOWN_HARMLESS's."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(message.startswith(start) for start, _ in KNOWN_HARMLESS)


def wanted(log_level: str) -> bool:
    """At the default levels only: log_level INFO (or higher), vLLM's WARNING, no logging config of the user's."""
    user_config = os.environ.get("VLLM_LOGGING_CONFIG_PATH") not in (None, "", _config_path)
    return (log_level.upper() != "DEBUG" and os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper() == "WARNING"
            and not user_config)


def keep_known_harmless_out(log_level: str, cpu: bool) -> None:
    """Called before vLLM starts on this rank (before its first import); does nothing unless `wanted`."""
    global _config_path
    if not wanted(log_level):
        return
    for name in IMPORT_TIME:
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownHarmless) for f in logger.filters):
            logger.addFilter(KnownHarmless())
    warnings.filterwarnings("ignore", message=TORCH_FUTURE_WARNING, category=FutureWarning)
    rule = f"ignore:{TORCH_FUTURE_WARNING}:FutureWarning"
    current = os.environ.get("PYTHONWARNINGS", "")
    if rule not in current:
        os.environ["PYTHONWARNINGS"] = f"{current},{rule}" if current else rule
    if cpu:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if _config_path is None:
        _config_path = write_logging_config(vllm_logging_config())
    if _config_path is not None:
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = _config_path


def vllm_logging_config() -> dict:
    """vLLM's default logging config at the level set (VLLM_LOGGING_LEVEL), with `KnownHarmless` on its handler."""
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper()
    for formatter in config["formatters"].values():
        formatter["log_level"] = level
    config["filters"] = {"spmd_dp_known_harmless": {"()": f"{__name__}.KnownHarmless"}}
    config["handlers"]["vllm"].update(level=level, filters=["spmd_dp_known_harmless"])
    config["loggers"]["vllm"]["level"] = level
    return config


def write_logging_config(config: dict) -> Optional[str]:
    """The config as a JSON file in spmd_dp's cache folder, named by its content (written once, atomically); None
    when the folder cannot be written (vLLM's own config applies then)."""
    from spmd_dp.models.embedded import default_cache_dir

    text = json.dumps(config, indent=1, sort_keys=True, default=str)
    path = default_cache_dir() / f"vllm-logging-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{path}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    except OSError:
        return None
    return str(path)
