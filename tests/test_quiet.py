"""The first screen (issue 25): spmd_dp sets no variable vLLM does not know, and vLLM's known-harmless warnings are
filtered at the default levels only (spmd_dp/engines/quiet.py; a real vLLM run's screen: tests/test_vllm_cpu.py)."""

import logging
import os

from spmd_dp.engines import set_engine_environment
from spmd_dp.engines.quiet import KNOWN_HARMLESS, KnownHarmless, wanted


def record(msg, *args, name="vllm.platforms.cpu"):
    return logging.LogRecord(name, logging.WARNING, "cpu.py", 224, msg, args, None)


def test_known_harmless_lines_are_dropped_and_others_kept():
    f = KnownHarmless()
    for start, why in KNOWN_HARMLESS:
        assert not f.filter(record(start + " and the rest")), start
        assert why  # each says why it is harmless
    assert not f.filter(record("%s is not found in LD_PRELOAD. For best performance ...", "libtcmalloc"))
    assert f.filter(record("Not enough KV cache blocks: lower max_model_len"))
    assert f.filter(record("vLLM says: Enforce eager set"))  # the start of the message, not anywhere in it


def test_only_at_the_default_levels(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    assert wanted("INFO") and not wanted("DEBUG")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    assert not wanted("INFO")  # VLLM_LOGGING_LEVEL=INFO brings them back
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "/my/logging.json")
    assert not wanted("INFO")  # the user's own logging config wins


def test_no_variable_vllm_does_not_know(monkeypatch):
    for k in ("VLLM_USE_V1", "VLLM_LOGGING_LEVEL"):
        monkeypatch.delenv(k, raising=False)
    set_engine_environment()
    assert "VLLM_USE_V1" not in os.environ and os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
