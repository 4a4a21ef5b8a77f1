"""A rank's share of the scan in processes forked for it (spmd_dp/inputs/scanners.py): what they send back is what
the scan in the rank's own thread makes, in piece order; an error in a piece is the same line as in-thread, a
scanner that dies is named; processes that got no work end on close."""

import os
import signal

import pytest

from spmd_dp.errors import RunFailure, UsageError
from spmd_dp.inputs.duplicates import KeyList
from spmd_dp.inputs.index import locator_to_json
from spmd_dp.inputs.records import RecordSpec
from spmd_dp.inputs.scan import Piece, _scan_piece
from spmd_dp.inputs.scanners import MAX_PROCESSES, Scanners, scan_processes
from spmd_dp.inputs.sources import resolve
from spmd_dp.testing import make_records, write_jsonl

SPEC = RecordSpec("id", lambda r: None if isinstance(r.get("prompt"), str) else "no prompt field 'prompt'")


def pieces_of(files, size):
    return [(k, Piece(i, s, min(s + size, f.size))) for k, (i, f, s) in
            enumerate((i, f, s) for i, f in enumerate(files) for s in range(0, f.size, size))]


def test_the_scanners_make_what_the_rank_would(tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", make_records(300))
    write_jsonl(tmp_path / "in" / "b.jsonl", make_records(200, prefix="b") + [{"id": "bad"}])
    files, _ = resolve([str(tmp_path / "in")])
    pieces = pieces_of(files, 4000)
    scanners = Scanners(SPEC, 16, None, processes=3)
    try:
        got = scanners.scan(files, pieces, rank=0)
    finally:
        scanners.close()
    assert [i for i, *_ in got] == [i for i, _ in pieces] and scanners.cpu_s > 0
    for (i, summary, keys, bad), (_, piece) in zip(got, pieces):
        own_keys, own_bad = KeyList(), []
        own = _scan_piece(piece, files[piece.file], SPEC, 16, own_keys, own_bad, None)
        own["locator"] = locator_to_json(own["locator"])
        assert summary == own and bytes(keys.blob) == bytes(own_keys.blob) and bad == own_bad
        assert list(keys.lines) == list(own_keys.lines)
    assert sum(len(b) for *_, b in got) == 1 and sum(s["records"] for _, s, *_ in got) == 501


def test_an_input_error_in_a_piece_is_the_same_line(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
    files, _ = resolve([str(tmp_path / "t.parquet")])
    scanners = Scanners(SPEC, 16, None, processes=1)
    try:
        with pytest.raises(UsageError, match=r"t.parquet is not a readable Parquet file"):
            scanners.scan(files, [(0, Piece(0, 0, files[0].size))], rank=2)
    finally:
        scanners.close()


def _dies_on_r00005(record):
    if record["id"] == "r00005":
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would, mid-scan
    return None


def test_a_scanner_that_dies_mid_scan_is_named(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_records(10))
    files, _ = resolve([str(tmp_path / "a.jsonl")])
    scanners = Scanners(RecordSpec("id", _dies_on_r00005), 16, None, processes=1)
    try:
        with pytest.raises(RunFailure, match=r"a scanner process of rank 3 died \(exit code -9\); it may have run "
                                             r"out of memory"):
            scanners.scan(files, [(0, Piece(0, 0, files[0].size))], rank=3)
    finally:
        scanners.close()


def test_scanners_with_no_work_end_on_close():
    scanners = Scanners(SPEC, 16, None, processes=2)
    procs = list(scanners.procs)
    assert len(scanners) == 2 and all(p.is_alive() for p in procs)
    scanners.close()
    assert [p.exitcode for p in procs] == [0, 0] and len(scanners) == 0


def test_how_many_scanners_a_rank_forks():
    cores = len(os.sched_getaffinity(0))
    assert scan_processes("cpu_engine", 1) == 1  # its cores are its engine's
    assert scan_processes("cuda", 1) == max(1, min(MAX_PROCESSES, cores - 1))
    assert scan_processes("cuda", 10 ** 6) == 1  # more ranks than cores: one each still
