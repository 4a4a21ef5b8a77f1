"""Fixtures. The helpers tests share are spmd_dp/testing.py's (scripts and benchmarks use the same) and, for tests
only, tests/helpers.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from spmd_dp.testing import make_records, write_jsonl


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "in.jsonl", make_records(50))


def _in_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")  # pytest-xdist: `make test` runs the tests in worker processes


def _group(item) -> Optional[str]:
    """The xdist group of a test: the vLLM tests are one (one worker runs their shared runs and reads them while
    the others take the rest), the Slurm tests another (one cluster); the tests of a module that share a
    module-scoped fixture (most often one shared run, tests/echo_jobs.py) one per module, since a worker builds
    such a fixture for itself: spread over 4 workers, a shared run of 16 ranks ran up to 4 times."""
    for group in ("vllm", "slurm"):
        if item.get_closest_marker(group) is not None:
            return group
    defs = item._fixtureinfo.name2fixturedefs  # every fixture the test uses, directly or through another
    if any(d[-1].scope == "module" for d in defs.values() if d):
        return item.module.__name__
    return None


def pytest_itemcollected(item):
    """Under pytest-xdist (`-n 4 --dist loadgroup`) a test of a group runs in the worker that runs the group
    (_group). Here, as each test is collected: xdist reads the groups in its own collection_modifyitems."""
    if _in_xdist_worker(item.config):
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(session, config, items):
    """One process alone: the vLLM tests last, their shared runs (tests/vllm_jobs.py) going on in the background
    meanwhile. Under pytest-xdist: the vLLM tests first (their group starts at once), then the other groups (a
    group runs in one worker: started late, it would end late), then the rest."""
    worker = _in_xdist_worker(config)
    def order(item):
        is_vllm = item.get_closest_marker("vllm") is not None
        if not worker:
            return is_vllm
        return not is_vllm, _group(item) is None

    items.sort(key=order)  # stable: the order within stays


@pytest.fixture(scope="session", autouse=True)
def vllm_runs(request, tmp_path_factory):
    """The real-vLLM runs the vLLM tests share (tests/vllm_jobs.py): the jobs the selected tests name in their
    marker, @pytest.mark.vllm("two_ranks", ...), started at the session's start in the background (none if no vLLM
    test is selected; under xdist when the first is read); reading one waits for it."""
    names = {n for item in request.session.items for m in item.iter_markers("vllm") for n in m.args}
    if not names:
        return None
    from tests.vllm_jobs import VllmRuns

    # under xdist every worker sees every test: the runs start in the worker that reads one first
    return VllmRuns(sorted(names), tmp_path_factory.mktemp("vllm"), start=not _in_xdist_worker(request.config))
