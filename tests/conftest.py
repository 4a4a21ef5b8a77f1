"""Fixtures. The helpers tests share are spmd_dp/testing.py's (scripts and benchmarks use the same) and, for tests
only, tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from spmd_dp.testing import make_records, write_jsonl


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "in.jsonl", make_records(50))


def pytest_collection_modifyitems(session, config, items):
    """The vLLM tests last: their shared runs (tests/vllm_jobs.py) go on in the background meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("vllm") is not None)  # stable: the order within stays


@pytest.fixture(scope="session", autouse=True)
def vllm_runs(request, tmp_path_factory):
    """The real-vLLM runs the vLLM tests share (tests/vllm_jobs.py): the jobs the selected tests name in their
    marker, @pytest.mark.vllm("two_ranks", ...), started at the session's start in the background (none if no vLLM
    test is selected); reading one waits for it."""
    names = {n for item in request.session.items for m in item.iter_markers("vllm") for n in m.args}
    if not names:
        return None
    from tests.vllm_jobs import VllmRuns

    return VllmRuns(sorted(names), tmp_path_factory.mktemp("vllm"))
