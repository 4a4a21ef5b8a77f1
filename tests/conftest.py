"""Fixtures. The helpers tests share are spmd_dp/testing.py's (scripts and benchmarks use the same) and, for tests
only, tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from spmd_dp.testing import make_records, write_jsonl


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "in.jsonl", make_records(50))


@pytest.fixture(scope="session")
def vllm_runs(request, tmp_path_factory):
    """The real-vLLM runs the vLLM tests share (tests/vllm_jobs.py), run once: the jobs the selected tests name in
    their marker, @pytest.mark.vllm("two_ranks", ...)."""
    from tests.vllm_jobs import VllmRuns

    names = {n for item in request.session.items for m in item.iter_markers("vllm") for n in m.args}
    return VllmRuns(sorted(names), tmp_path_factory.mktemp("vllm"))
