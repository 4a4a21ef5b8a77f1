"""Sharded output (output_mode=sharded): ranks write their own parts, rank 0 journals their metadata and makes the
folder of shards; exactly-once stays rank 0's decision. Unit tests on the journal and the writer, then real torchrun
runs: 16 ranks, kill -9 under --max-restarts, the shard set read back by pyarrow.dataset, datasets and pandas."""

import glob
import json
import os
import random
import re
import signal
import zlib
from pathlib import Path

import pytest

from spmd_dp.errors import RunFailure
from spmd_dp.output.journal import Journal
from spmd_dp.control.messages import BatchDone
from spmd_dp.config import load_config
from spmd_dp.control.local import LocalGroup
from spmd_dp.output.paths import OutputPaths
from spmd_dp.output.shards import ShardWriter, finish_shards
from spmd_dp.output.sink import Output
from spmd_dp.testing import (echo_args, expected_rows, launch, make_records, read_jsonl, wait_for_batches, wait_until,
                             worker_pids, write_jsonl)
from tests.echo_jobs import echo_node, run_echo_workflow

FP = {"input_sha256": "abc", "n_records": 12}


def paths(tmp_path):
    t = tmp_path
    return OutputPaths(t, t / "t.jsonl", t / "t.metrics.json", t / "t.config.yaml", t / "t.journal.jsonl",
                       t / "t.parts", t / "t.errors.jsonl", t / "t")


def opened(tmp_path):
    j = Journal(paths(tmp_path), FP)
    j.open(overwrite=False)
    return j


def writer(j, rank, fmt="jsonl"):
    """A rank's ShardWriter, as its sink uses it: batch [start, stop) written as a part, its message for rank 0."""
    w = ShardWriter(j.paths.parts, fmt, rank, ["v"])

    def write(start, stop, rows=None):
        data = [{"i": i, "v": None if rows == "null" else i * 0.5} for i in range(start, stop)]
        return BatchDone(start // 4, start, stop, rank, [], part=w.write(start, stop, data))
    return write


def shard_rows(folder: Path, ext="jsonl"):
    return [row for f in sorted(folder.glob(f"*.{ext}")) for row in read_jsonl(f)]


def test_a_batch_delivered_twice_is_journaled_once_and_its_second_shard_removed(tmp_path):
    j = opened(tmp_path)
    w0, w1 = writer(j, 0), writer(j, 1)
    first, again = w0(0, 4), w1(0, 4)  # e.g. handed back, yet finished by both
    assert first.lines == [] and first.part["rows"] == 4 and again.part["name"] != first.part["name"]
    data = (j.paths.parts / first.part["name"]).read_bytes()
    assert first.part["bytes"] == len(data) and first.part["crc32"] == zlib.crc32(data)
    j.commit([first, w1(4, 8)])
    j.commit([again, w0(8, 12)])  # one round: the duplicate and a new batch
    assert not (j.paths.parts / again.part["name"]).exists()
    assert j.committed_spans() == [(0, 4), (4, 8), (8, 12)]
    records, size = finish_shards(j, "jsonl")
    assert not j.paths.parts.exists() and records == 12
    assert [r["i"] for r in shard_rows(j.paths.shards)] == list(range(12))  # each record once, in input order
    manifest = json.loads(j.paths.manifest.read_text())
    assert [s["start"] for s in manifest["shards"]] == [0, 4, 8] and manifest["records"] == 12
    assert sorted(os.listdir(j.paths.shards)) == ["_manifest.json"] + [s["path"] for s in manifest["shards"]]
    assert all(zlib.crc32((j.paths.shards / s["path"]).read_bytes()) == s["crc32"] for s in manifest["shards"])
    assert size == sum(s["bytes"] for s in manifest["shards"])
    j.close()
    again_open = Journal(paths(tmp_path), FP)
    again_open.open(overwrite=False)
    assert again_open.complete  # a rerun finds it done


def test_a_part_not_in_the_journal_is_not_output(tmp_path):
    j = opened(tmp_path)
    w = writer(j, 1)
    j.commit([w(0, 4)])
    orphan = w(4, 8)  # written, but its message never reached rank 0 (a crash)
    j.close()
    assert (j.paths.parts / orphan.part["name"]).exists()
    j2 = opened(tmp_path)  # the resume
    assert not (j2.paths.parts / orphan.part["name"]).exists() and j2.missing(12) == [(4, 12)]
    w2 = writer(j2, 0)
    j2.commit([w2(4, 8), w2(8, 12)])
    late = w(8, 12)  # a part a rank wrote after rank 0 had committed the batch from another
    finish_shards(j2, "jsonl")
    assert not (j2.paths.shards / late.part["name"]).exists()
    assert [r["i"] for r in shard_rows(j2.paths.shards)] == list(range(12))


def test_a_crash_between_the_rename_and_the_journal_line_is_resumed(tmp_path):
    j = opened(tmp_path)
    w = writer(j, 0)
    j.commit([w(0, 4), w(4, 8), w(8, 12)])
    j.mark_complete = lambda *a: (_ for _ in ()).throw(OSError("crash"))  # dies right after the rename
    with pytest.raises(OSError):
        finish_shards(j, "jsonl")
    j.close()
    assert j.paths.shards.exists() and not j.paths.parts.exists()
    j2 = opened(tmp_path)
    assert not j2.complete and j2.paths.parts.exists() and j2.missing(12) == []
    finish_shards(j2, "jsonl")
    assert [r["i"] for r in shard_rows(j2.paths.shards)] == list(range(12))


def test_a_missing_committed_shard_is_one_clear_line(tmp_path):
    j = opened(tmp_path)
    done = writer(j, 0)(0, 12)
    j.commit([done])
    (j.paths.parts / done.part["name"]).unlink()
    with pytest.raises(RunFailure, match="1 committed shards are missing from .*rerun with overwrite=true"):
        finish_shards(j, "jsonl")


def test_a_rank_that_does_not_see_rank0s_folder_is_told_so(tmp_path):
    output = Output(load_config([f"output_dir={tmp_path}", "name=t", "output_mode=sharded"]))
    output.paths.parts.mkdir()
    assert output.check_shared(LocalGroup(), output.share()) is None
    assert output.check_shared(LocalGroup(), None) is None  # single mode: nothing to check
    line = output.check_shared(LocalGroup(), "0123456789ab")  # a marker this rank does not see
    assert re.match(r"output error: output_mode=sharded: ranks \[0\] do not see .* a filesystem every rank shares", line)


def test_parquet_shards_are_brought_to_one_schema(tmp_path):
    import pyarrow.dataset as ds

    j = opened(tmp_path)
    w = writer(j, 0, "parquet")
    parts = [w(0, 4, "null"), w(4, 8), w(8, 12)]  # batch 0's column v: all null
    assert parts[0].part["schema"] != parts[1].part["schema"] == parts[2].part["schema"]
    j.commit(parts)
    finish_shards(j, "parquet")
    table = ds.dataset(j.paths.shards).to_table()
    assert str(table.schema.field("v").type) == "float"  # float32: a float column spmd_dp writes
    assert table.column("i").to_pylist() == list(range(12))
    assert table.column("v").to_pylist() == [None] * 4 + [i * 0.5 for i in range(4, 12)]


# --- real torchrun ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sixteen(tmp_path_factory):
    """One run of 16 ranks (tests/echo_jobs.py), 400 records to a folder of shards (node sharded), then to one file
    (node single)."""
    folder = tmp_path_factory.mktemp("sixteen")
    nodes = [echo_node(folder, mode, SIXTEEN, output_mode=mode, batch_size=8, engine_options={"echo_delay_s": 0.002})
             for mode in ("sharded", "single")]
    return run_echo_workflow(folder, nodes, 16, "log_level=WARNING")


SIXTEEN = make_records(400)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sharded", "single"])
def test_sixteen_ranks(sixteen, mode):
    assert sixteen.returncode == 0, sixteen.tail()
    out = sixteen.out
    rows = shard_rows(out / mode) if mode == "sharded" else read_jsonl(out / f"{mode}.jsonl")
    assert rows == expected_rows(SIXTEEN, mode)  # complete, in input order, each key once
    ranks = sixteen.metrics(mode)["ranks"]
    assert len(ranks) == 16 and sum(r["records"] for r in ranks) == 400
    if mode == "sharded":
        manifest = json.loads((out / mode / "_manifest.json").read_text())
        assert len(manifest["shards"]) == 50 and manifest["records"] == 400
        writers = {s["path"].split("-")[3] for s in manifest["shards"]}
        assert len(writers) > 1  # the ranks wrote their own shards
        assert not (out / f"{mode}.jsonl").exists() and not (out / f"{mode}.parts").exists()


def unjournaled_parts(out: Path):
    named = {s[2] for line in (out / "out.journal.jsonl").read_text().splitlines()[1:] if line.endswith("}")
             for s in json.loads(line).get("shards", [])}
    return [p for p in (out / "out.parts").glob("part-*") if p.name not in named]


@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.parametrize("victim", ["a rank", "rank 0, frozen first"])
def test_kill_9_of_a_rank_in_sharded_mode_gives_every_key_once(tmp_path, victim):
    """A rank killed mid-run under --max-restarts=1; the group restarts and resumes from the journal. Parts written
    but never journaled are removed and their batches redone: no key twice. To be sure there are such parts, the
    second case stops rank 0 (SIGSTOP) until the others have written parts it cannot journal, then kills it."""
    rng = random.Random(0)
    records = make_records(240, words=6)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    proc = launch(echo_args(tmp_path, inp, "batch_size=6", "engine_options.echo_delay_s=0.01",
                            "output_mode=sharded"), nproc=3, torchrun_args=["--max-restarts=1"])
    out_dir = tmp_path / "out"
    kill_after = rng.randint(3, 12)  # committed batches before the kill
    wait_for_batches(out_dir / "out.journal.jsonl", kill_after, proc)
    pids = worker_pids(proc.pid)
    if victim == "a rank":
        os.kill(pids[rng.randrange(1, 3)], signal.SIGKILL)
    else:
        os.kill(pids[0], signal.SIGSTOP)
        wait_until(lambda: bool(unjournaled_parts(out_dir)), 30)
        orphans = unjournaled_parts(out_dir)
        assert orphans, "no rank wrote a part while rank 0 was stopped"
        os.kill(pids[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert "resuming:" in out
    folder = out_dir / "out"
    assert shard_rows(folder) == expected_rows(records)  # every key once, in input order
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert sorted(os.listdir(folder)) == ["_manifest.json"] + [s["path"] for s in manifest["shards"]]
    if victim != "a rank":
        removed = [ln for ln in out.splitlines() if "parts no journal line names" in ln]
        assert removed and all(p.name not in manifest_paths(manifest) for p in orphans), out[-3000:]


def manifest_paths(manifest):
    return {s["path"] for s in manifest["shards"]}


READ_BACK = make_records(90)


@pytest.fixture(scope="module")
def read_back(tmp_path_factory):
    """One run of 3 ranks (tests/echo_jobs.py): for each format, the single file (node <fmt>_single), the folder of
    shards (<fmt>_sharded) and the shards merged (<fmt>_merged), with the per-record columns of issue 16."""
    folder = tmp_path_factory.mktemp("read_back")
    modes = {"single": {}, "sharded": {"output_mode": "sharded"}, "merged": {"output_mode": "sharded", "merge": True}}
    nodes = [echo_node(folder, f"{fmt}_{mode}", READ_BACK, output_format=fmt, batch_size=8,
                       generation_options={"logprobs": 2}, **extra)
             for fmt in ("jsonl", "parquet") for mode, extra in modes.items()]
    return run_echo_workflow(folder, nodes, 3)


def renamed(table, name, to):
    """The table with the columns of node `name` (name, name_logprobs, ...) named as node `to`'s."""
    return table.rename_columns([to + c[len(name):] if c.startswith(name) else c for c in table.column_names])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_shard_set_reads_back_as_the_single_file(read_back, fmt):
    """pyarrow.dataset, datasets and pandas read the folder of shards as one dataset, equal to the single-file
    output record for record (with the per-record columns of issue 16: token ids, logprobs as float32, metadata);
    merge=true writes that single file from the shards. The nodes' names differ (the output column is the name):
    the single file's columns are compared under the sharded node's names."""
    import datasets
    import pandas as pd
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    assert read_back.returncode == 0, read_back.tail()
    out = read_back.out
    one, sh, merged = f"{fmt}_single", f"{fmt}_sharded", f"{fmt}_merged"
    folder = out / sh
    files = sorted(glob.glob(str(folder / f"*.{fmt}")))
    if fmt == "jsonl":
        single = renamed(ds.dataset(out / f"{one}.jsonl", format="json").to_table(), one, sh)
        table = ds.dataset(folder, format="json").to_table()
        assert (out / f"{merged}.jsonl").read_text().replace(f'"{merged}', f'"{one}') == \
            (out / f"{one}.jsonl").read_text()
    else:
        single = renamed(pq.read_table(out / f"{one}.parquet"), one, sh)
        table = ds.dataset(folder).to_table()
        assert renamed(pq.read_table(out / f"{merged}.parquet"), merged, sh).equals(single)
        assert str(table.schema.field(f"{sh}_logprobs").type.field("logprobs").type) == "list<element: float>"
    assert table.equals(single)
    assert table.to_pylist() == single.to_pylist() and len(single) == 90
    hf = datasets.load_dataset("json" if fmt == "jsonl" else "parquet", data_files=files, split="train")
    assert hf.to_list() == single.to_pylist()
    frame = pd.read_parquet(folder) if fmt == "parquet" else pd.concat([pd.read_json(f, lines=True, dtype=False)
                                                                         for f in files], ignore_index=True)
    assert frame["id"].tolist() == [r["id"] for r in READ_BACK]
    assert frame[sh].tolist() == [r[sh] for r in single.to_pylist()]
