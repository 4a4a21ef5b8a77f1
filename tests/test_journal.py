"""The journal: atomic parts, exactly-once, resume, a torn last line, refusal of another run's journal."""

import json

import pytest

from spmd_dp.output.journal import Journal
from spmd_dp.control.messages import BatchDone
from spmd_dp.output.final import assemble
from spmd_dp.output.paths import OutputPaths
from spmd_dp.errors import UsageError

FP = {"input_sha256": "abc", "n_records": 10}


def batch(start, stop):
    return BatchDone(start, start, stop, 0, [json.dumps({"i": i}) for i in range(start, stop)])


def journal(tmp_path, fp=FP):
    return Journal(OutputPaths(tmp_path, tmp_path / "t.jsonl", tmp_path / "t.metrics.json", tmp_path / "t.config.yaml",
                               tmp_path / "t.journal.jsonl", tmp_path / "t.parts", tmp_path / "t.errors.jsonl"), fp)


def test_commit_resume_and_assemble_in_input_order(tmp_path):
    j = journal(tmp_path)
    j.open(overwrite=False)
    j.commit([batch(6, 10), batch(0, 3)])
    j.commit([batch(0, 3)])  # a duplicate delivery is committed once
    j.close()
    j2 = journal(tmp_path)
    j2.open(overwrite=False)
    assert j2.committed_spans() == [(0, 3), (6, 10)]
    assert j2.missing(10) == [(3, 6)]
    with pytest.raises(RuntimeError, match="not committed"):
        assemble(j2, 10)
    j2.commit([batch(3, 6)])
    assemble(j2, 10)
    assert [json.loads(x)["i"] for x in (tmp_path / "t.jsonl").read_text().splitlines()] == list(range(10))
    assert not (tmp_path / "t.parts").exists()
    j3 = journal(tmp_path)
    j3.open(overwrite=False)
    assert j3.complete


def test_torn_last_line_and_orphan_part_are_redone(tmp_path):
    j = journal(tmp_path)
    j.open(overwrite=False)
    j.commit([batch(0, 5)])
    j.close()
    (tmp_path / "t.parts" / "part-00000007.jsonl").write_text("orphan\n")  # renamed, never journaled
    with open(tmp_path / "t.journal.jsonl", "ab") as f:
        f.write(b'{"part": "part-0000')  # crash mid-append
    j2 = journal(tmp_path)
    j2.open(overwrite=False)
    assert j2.committed_spans() == [(0, 5)]
    assert not (tmp_path / "t.parts" / "part-00000007.jsonl").exists()
    j2.commit([batch(5, 10)])
    assemble(j2, 10)
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 10


def test_another_runs_journal_is_refused_unless_overwrite(tmp_path):
    j = journal(tmp_path)
    j.open(overwrite=False)
    j.commit([batch(0, 5)])
    j.close()
    with pytest.raises(UsageError, match=r"different run \(input_sha256 changed\).*overwrite=true"):
        journal(tmp_path, {**FP, "input_sha256": "def"}).open(overwrite=False)
    j2 = journal(tmp_path, {**FP, "input_sha256": "def"})
    j2.open(overwrite=True)
    assert j2.committed_spans() == []


def test_existing_output_without_journal_is_never_overwritten(tmp_path):
    (tmp_path / "t.jsonl").write_text("precious\n")
    with pytest.raises(UsageError, match="exists and no journal"):
        journal(tmp_path).open(overwrite=False)
    assert (tmp_path / "t.jsonl").read_text() == "precious\n"


def test_a_journal_with_nothing_committed_binds_no_one(tmp_path):
    j = journal(tmp_path)
    j.open(overwrite=False)  # a run that failed before committing anything
    j.close()
    (tmp_path / "t.parts" / "part-00000000.jsonl").write_text("never journaled\n")
    other = {**FP, "model_name": "fixed"}
    j2 = journal(tmp_path, other)
    j2.open(overwrite=False)  # the corrected run takes the folder
    assert json.loads((tmp_path / "t.journal.jsonl").read_text().splitlines()[0])["fingerprint"] == other
    assert list((tmp_path / "t.parts").iterdir()) == []
    j2.commit([batch(0, 5)])
    j2.close()
    with pytest.raises(UsageError, match=r"different run \(model_name changed\)"):
        journal(tmp_path).open(overwrite=False)  # bound now


def test_a_complete_journal_is_said_complete_and_opening_it_changes_nothing(tmp_path):
    from spmd_dp.output.journal import said_complete

    j = journal(tmp_path)
    assert not said_complete(j.paths)
    j.open(overwrite=False)
    j.commit([batch(0, 10)])
    assert not said_complete(j.paths)
    assemble(j, 10)
    j.close()
    assert said_complete(j.paths) and not (tmp_path / "t.parts").exists()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    j2 = journal(tmp_path)
    j2.open(overwrite=False)
    j2.close()
    assert j2.complete and sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before
    (tmp_path / "t.jsonl").unlink()
    assert not said_complete(j.paths)  # the output is gone: the run is done again
