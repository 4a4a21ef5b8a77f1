"""Fixtures. The helpers tests share are spmd_dp/testing.py's (scripts and benchmarks use the same) and, for tests
only, tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from spmd_dp.testing import make_records, write_jsonl


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "in.jsonl", make_records(50))
