"""Rerunning into an output folder (issue 25): a complete output starts no engine and leaves the folder as it is; a
first run that committed nothing does not bind the folder; a changed run is still refused, overwrite=true still works."""

import json

import pytest

from spmd_dp.testing import echo_args, expected_rows, make_records, read_jsonl, spmd, write_jsonl


def folder(out):
    """Every file under the output folder with its bytes and mtime (what a rerun must leave as it is)."""
    return {p.name: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


@pytest.mark.slow
def test_a_complete_output_starts_no_engine_and_leaves_the_folder_as_it_is(tmp_path):
    records = make_records(40)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    args = echo_args(tmp_path, inp, "batch_size=8")
    first = spmd(args, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    before = folder(tmp_path / "out")
    assert "out.parts" not in before and "Worker rank 1 is ready" in first.stderr
    # an engine that takes 20 s to start: a rerun that started it would log it ready, or stop it
    again = spmd([*args, "engine_options.echo_start_s=20"], nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "out.jsonl is complete already" in again.stderr and "nothing to do" in again.stderr
    assert "is ready" not in again.stderr and "stopping the engine" not in again.stderr, again.stderr
    assert folder(tmp_path / "out") == before  # no parts folder, config.yaml and metrics.json not rewritten
    assert read_jsonl(tmp_path / "out" / "out.jsonl") == expected_rows(records)


@pytest.mark.slow
def test_a_complete_output_of_another_run_is_refused_and_overwrite_still_works(tmp_path):
    records = make_records(20)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    args = echo_args(tmp_path, inp, "batch_size=8")
    assert spmd(args).returncode == 0
    more = make_records(25)
    write_jsonl(inp, more)  # the input changed: the journal (complete) was written for another run
    p = spmd([*args, "engine_options.echo_start_s=20"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert "was written for a different run (input_sha256, n_records changed)" in p.stderr
    assert "set overwrite=true" in p.stderr and "is ready" not in p.stderr
    p = spmd([*args, "overwrite=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_jsonl(tmp_path / "out" / "out.jsonl") == expected_rows(more)


@pytest.mark.slow
def test_a_first_run_that_committed_nothing_does_not_block_the_corrected_rerun(tmp_path):
    records = make_records(12)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    failed = spmd(echo_args(tmp_path, inp, "model_name=spmd-dp/tiny-lama", "engine_options.echo_fail_ranks=[0]"))
    assert failed.returncode == 1, failed.stderr[-3000:]  # its engine could not start: nothing committed
    header, *rest = [json.loads(x) for x in (tmp_path / "out" / "out.journal.jsonl").read_text().splitlines()]
    assert header["fingerprint"]["model_name"] == "spmd-dp/tiny-lama" and rest == []
    fixed = spmd(echo_args(tmp_path, inp, "model_name=spmd-dp/tiny-llama"))
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "had nothing committed: it now belongs to this run (model_name changed)" in fixed.stderr
    assert read_jsonl(tmp_path / "out" / "out.jsonl") == expected_rows(records)
    # once something is committed, the folder is bound: a third run with another model is refused
    other = spmd(echo_args(tmp_path, inp, "model_name=spmd-dp/small-llama"))
    assert other.returncode == 2 and "different run (model_name changed)" in other.stderr, other.stderr[-3000:]
