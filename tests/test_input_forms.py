"""Inputs as users hold them, end to end (real torchrun, gloo, the echo engine): each form under 2 ranks gives,
record for record, the output of a run over one JSONL file; the scan is shared by the ranks and merges into
the index one rank alone builds; a bad input found in any rank's share is one line on all; a run resumes on
any number of ranks and refuses a changed set of files; the scan runs while the engines start."""

import json
import re

import pytest

from spmd_dp.config import load_config
from spmd_dp.inputs import RecordSpec, scan_input
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.testing import echo_args, make_records, read_jsonl, spmd, write_jsonl
from tests.helpers import RECORDS, one_line, write_forms


def run_args(tmp_path, data_dir, input_path, *extra, name="out"):
    return [f"data_dir={data_dir}", f"input_data_path={input_path}", f"output_dir={tmp_path / 'out'}", f"name={name}",
            "inference_engine=echo", "generation_options.max_tokens=3", "batch_size=32", *extra]


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    return write_forms(tmp_path_factory.mktemp("forms"))


@pytest.fixture(scope="module")
def reference(forms, tmp_path_factory):
    """The output of one process over the records as one JSONL file."""
    tmp = tmp_path_factory.mktemp("reference")
    p = spmd(run_args(tmp, forms, "all.jsonl"))
    assert p.returncode == 0, p.stderr[-3000:]
    return (tmp / "out" / "out.jsonl").read_text()


@pytest.mark.parametrize("form", ["parquet", "shards/*.jsonl", "all.jsonl.gz", "hf"])
def test_each_form_under_two_ranks_gives_the_single_jsonl_output(forms, reference, tmp_path, form):
    p = spmd(run_args(tmp_path, forms, form), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "out" / "out.jsonl").read_text() == reference  # record for record, in input order
    assert reference.count("\n") == len(RECORDS) and '"out": "w0 a b"' in reference
    shares = dict(re.findall(r"input: rank (\d) scans (\d+) of", p.stderr))
    assert sorted(shares) == ["0", "1"]
    if form != "all.jsonl.gz":  # a compressed file is one piece; the others are shared
        assert int(shares["0"]) > 0 and int(shares["1"]) > 0, p.stderr[-3000:]
    digests = set(re.findall(r"input index: 700 records in \d+ files, \d+ pieces, digest (\w+)", p.stderr))
    assert len(digests) == 1  # both ranks built the same index


@pytest.mark.timing
def test_the_scan_is_shared_by_four_ranks_while_the_engines_start(tmp_path):
    """24000 records (3.3 MB: 4 pieces): each of 4 ranks indexes one piece (the log says which); every rank's
    merged index is the index of a scan by one rank alone; the scan ran while the engines were starting."""
    records = make_records(24000, words=12)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp, "batch_size=256", "engine_options.echo_start_s=2"), nproc=4)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stderr
    size = inp.stat().st_size
    shares = {int(r): (int(a), int(b)) for r, a, b in re.findall(
        r"input: rank (\d) scans 1 of 4 pieces \([\d.]+ MB\): \S+in.jsonl bytes (\d+)\.\.(\d+)", log)}
    assert sorted(shares) == [0, 1, 2, 3], log[-3000:]
    assert sorted(shares.values()) == [(0, 1 << 20), (1 << 20, 2 << 20), (2 << 20, 3 << 20), (3 << 20, size)]
    digests = dict(re.findall(r"\[rank (\d)/4 [^]]*\] INFO input index: 24000 records in 1 files, 4 pieces, "
                              r"digest (\w+)", log))
    one_rank, _ = scan_input(inp, RecordSpec("id", PromptBuilder(load_config([])).check), 256)
    assert len(digests) == 4 and set(digests.values()) == {one_rank.digest()[:16]}
    for r in range(4):  # each rank's index was merged before its engine (2 s to start) was ready
        merged = re.search(rf"\[rank {r}/4 [^]]*\] INFO input index", log)
        ready = re.search(rf"Worker rank {r} is ready \(engine started in ([\d.]+)s\)", log)
        assert merged and ready and merged.start() < ready.start() and float(ready.group(1)) >= 2
    rows = read_jsonl(tmp_path / "out" / "out.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert rows[12345]["out"] == " ".join(records[12345]["prompt"].split()[:4])


def test_bad_input_in_any_share_is_one_line_on_every_rank(tmp_path):
    """b.jsonl (rank 1's share) repeats a key of a.jsonl (rank 0's): the duplicate check, partitioned by key hash
    over the ranks, names both places. A Parquet file cut in half, in rank 1's share, is named too. The engines
    take 10 minutes to start: the run ends at once anyway (the test allows 2)."""
    d = tmp_path / "data"
    write_jsonl(d / "a.jsonl", make_records(40))
    write_jsonl(d / "b.jsonl", make_records(39, prefix="b") + [{"id": "r00007", "prompt": "again"}])
    p = spmd(run_args(tmp_path, d, "*.jsonl", "engine_options.echo_start_s=600"), nproc=2, timeout=120)
    assert p.returncode == 1  # torchrun's: each rank exits 2
    assert f"rank 1 scans 1 of 2 pieces (0.0 MB): {d}/b.jsonl" in p.stderr
    assert one_line(p) == (f"spmd_dp: input error: {d}/b.jsonl:40: duplicate primary key 'r00007' (first at "
                           f"{d}/a.jsonl:8); primary keys must be unique; fix the input, or set on_bad_record=skip to "
                           f"write bad records to the errors file and run the rest")
    assert p.stderr.count("exitcode  : 2") == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    (d / "t").mkdir()
    pq.write_table(pa.Table.from_pylist(make_records(40)), d / "t" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(make_records(40, prefix="b")), d / "t" / "b.parquet")
    data = (d / "t" / "b.parquet").read_bytes()
    (d / "t" / "b.parquet").write_bytes(data[:len(data) // 2])
    p = spmd(run_args(tmp_path, d / "t", "."), nproc=2, timeout=120)
    assert p.returncode == 1 and p.stderr.count("exitcode  : 2") == 2
    assert one_line(p).startswith(f"spmd_dp: input error: {d}/t/b.parquet is not a readable Parquet file")


def test_skip_over_ranks_and_files_writes_every_bad_record_once(tmp_path):
    d = tmp_path / "data"
    write_jsonl(d / "a.jsonl", make_records(30))
    (d / "b.jsonl").write_text('{"id": "x", "prompt": \n' + json.dumps({"id": "r00003", "prompt": "dup"}) + "\n" +
                               "\n".join(json.dumps(r) for r in make_records(20, prefix="b")) + "\n")
    p = spmd(run_args(tmp_path, d, "*.jsonl", "on_bad_record=skip"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")] == \
        [r["id"] for r in make_records(30) + make_records(20, prefix="b")]
    errors = read_jsonl(tmp_path / "out" / "out.errors.jsonl")
    assert [(e["file"], e["line"], e["position"]) for e in errors] == [(f"{d}/b.jsonl", 1, 30), (f"{d}/b.jsonl", 2, 31)]
    assert "malformed JSON" in errors[0]["error"] and f"first at {d}/a.jsonl:4" in errors[1]["error"]


def test_resume_on_any_number_of_ranks_and_refuse_a_changed_set_of_files(forms, tmp_path):
    d = tmp_path / "data"
    for k in range(3):
        write_jsonl(d / f"part-{k}.jsonl", RECORDS[k * 200:(k + 1) * 200])
    assert spmd(run_args(tmp_path, d, "part-*.jsonl"), nproc=2).returncode == 0
    again = spmd(run_args(tmp_path, d, "part-*.jsonl"))  # one rank now: the same input, the same fingerprint
    assert again.returncode == 0 and "is complete already" in again.stderr, again.stderr[-3000:]
    write_jsonl(d / "part-3.jsonl", RECORDS[600:])
    changed = spmd(run_args(tmp_path, d, "part-*.jsonl"))
    assert changed.returncode == 2
    assert "was written for a different run (input_sha256, n_records changed)" in one_line(changed)
