"""A world of one (spmd_dp/control/local.py): LocalStore behaves as c10d's store for every call spmd_dp makes (the
same checks on both, c10d's HashStore and PrefixStore beside it), LocalGroup's collectives return what the one rank
gave, and a run of one rank imports no torch (spmd_dp/control/comm.py chooses)."""

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from spmd_dp.control.comm import make_group, substore
from spmd_dp.control.local import LocalGroup, LocalStore
from spmd_dp.testing import REPO, echo_args, make_records, read_jsonl, write_jsonl


def new_store(kind: str, timeout_s: float):
    if kind == "local":
        return LocalStore(timedelta(seconds=timeout_s))
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


@pytest.mark.parametrize("kind", ["c10d", "local"])
def test_the_calls_spmd_dp_makes_behave_alike(kind):
    store = new_store(kind, 0.3)
    assert store.add("n", 2) == 2 and store.add("n", -1) == 1 and store.get("n") == b"1"  # a counter reads as bytes
    store.set("s", "x y")
    store.set("b", b"\x00\xff")
    assert store.multi_get(["n", "s", "b"]) == [b"1", b"x y", b"\x00\xff"]
    assert store.check(["n", "s"]) and not store.check(["n", "missing"])
    with pytest.raises(RuntimeError, match="(?i)timeout"):  # c10d: DistStoreError, a RuntimeError
        store.get("missing")
    with pytest.raises(RuntimeError, match="(?i)timeout"):
        store.wait(["missing"], timedelta(seconds=0.1))
    # a namespace: its keys are prefix/key in the store beneath, and it sees none of the others
    job = substore(store, "job0")
    work = substore(job, "work")
    work.set("k", "v")
    assert store.check(["job0/work/k"]) and not job.check(["k"]) and work.get("k") == b"v"
    assert work.add("n", 5) == 5 and store.get("n") == b"1"


@pytest.mark.parametrize("kind", ["c10d", "local"])
def test_a_wait_ends_when_another_thread_sets_the_key(kind):
    store = new_store(kind, 5)
    threading.Timer(0.2, lambda: store.set("released", "1")).start()
    t0 = time.monotonic()
    store.wait(["released"], timedelta(seconds=5))
    assert 0.1 < time.monotonic() - t0 < 2


def test_a_group_of_one_returns_what_it_gave():
    g = make_group(LocalStore(), 0, 1, timedelta(seconds=1), is_rank0=True)
    assert isinstance(g, LocalGroup) and (g.rank, g.world, g.is_rank0) == (0, 1, True)
    assert g.all_gather_ints([3, 4]) == [[3, 4]] and g.min(2.5) == 2.5
    assert g.broadcast_json({"a": [1]}) == {"a": [1]} and g.broadcast_bytes(None) == b"" == g.broadcast_bytes(b"")
    assert g.all_gather_bytes(b"x") == [b"x"] == g.gather_bytes(b"x") and g.alltoall_bytes([b"y"]) == [b"y"]


def test_a_run_of_one_rank_imports_no_torch(tmp_path):
    """The echo engine on one rank: the whole run (scan, claims, control plane, output) without torch."""
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", make_records(10))
    code = "import sys; from spmd_dp.cli import main; main(sys.argv[1:]); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code, *echo_args(tmp_path, inp)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("False"), p.stdout + p.stderr[-2000:]
    assert len(read_jsonl(tmp_path / "out" / "out.jsonl")) == 10
