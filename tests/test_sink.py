"""A node's output as one object (spmd_dp/output/sink.py): what output_mode means, decided by `Output` alone (paths,
the sink, the end), the single-mode sink (rows as JSON lines in the batch's message) and the sharded one (a part
written on the sink's own thread, in the order the batches finished; a write that fails is raised in the caller)."""

import json
import threading

import pyarrow.parquet as pq
import pytest

from spmd_dp.config import load_config
from spmd_dp.control.messages import BatchDone
from spmd_dp.errors import RunFailure
from spmd_dp.output.shards import ShardWriter
from spmd_dp.output.sink import Output, ShardSink, Sink


def cfg(tmp_path, *overrides):
    return load_config([f"output_dir={tmp_path / 'out'}", "name=res", *overrides])


def rows(start, stop):
    return [{"id": i, "res": f"text {i}", "vec": None} for i in range(start, stop)]


def test_single_mode_one_file_rows_as_json_lines(tmp_path):
    out = Output(cfg(tmp_path))
    assert not out.sharded and out.path == tmp_path / "out" / "res.jsonl" and out.share() is None
    assert out.check_shared(group=None, token=None) is None  # nothing to check: rank 0 writes everything
    got = []
    sink = out.sink(3, got.append)
    assert type(sink) is Sink
    sink.put(BatchDone(7, 70, 72, 3, []), rows(70, 72))
    sink.check()
    sink.close()
    (msg,) = got
    assert (msg.index, msg.start, msg.stop, msg.rank, msg.part) == (7, 70, 72, 3, None)
    assert [json.loads(line) for line in msg.lines] == rows(70, 72)


def test_sharded_mode_a_folder_and_each_rank_writes_its_parts(tmp_path):
    out = Output(cfg(tmp_path, "output_mode=sharded", "output_format=parquet"))
    assert out.sharded and out.path == tmp_path / "out" / "res" and out.paths.final.suffix == ".parquet"
    merged = Output(cfg(tmp_path, "output_mode=sharded", "merge=true"))  # the ranks write, the end is one file
    assert merged.sharded and merged.path == tmp_path / "out" / "res.jsonl"
    out.paths.parts.mkdir(parents=True)  # rank 0's journal makes it (Journal.open)
    got = []
    sink = out.sink(1, got.append)
    assert isinstance(sink, ShardSink)
    sink.put(BatchDone(0, 0, 3, 1, []), rows(0, 3))
    sink.close()
    (msg,) = got
    assert msg.lines == [] and msg.part["rows"] == 3 and "-r1-" in msg.part["name"]  # metadata only, to rank 0
    table = pq.read_table(out.paths.parts / msg.part["name"])
    assert table.to_pylist() == rows(0, 3)


class Group:
    """The all-gather of a world where some ranks look at a folder of their own."""

    def __init__(self, seen_by):
        self.seen_by = seen_by

    def all_gather_bytes(self, mine):
        return [mine if r in self.seen_by else b"0" for r in range(3)]


def test_every_rank_must_see_rank0s_folder(tmp_path):
    out = Output(cfg(tmp_path, "output_mode=sharded"))
    out.paths.parts.mkdir(parents=True)
    token = out.share()
    assert out.check_shared(Group({0, 1, 2}), token) is None
    line = out.check_shared(Group({0}), token)
    assert line.startswith(f"output error: output_mode=sharded: ranks [1, 2] do not see {out.paths.parts}, where "
                           f"rank 0 writes") and "output_mode=single" in line
    elsewhere = Output(cfg(tmp_path / "elsewhere", "output_mode=sharded"))  # a rank whose output_dir is another one
    assert elsewhere.check_shared(Group({0, 1, 2}), token).startswith("output error: output_mode=sharded: ranks [0, 1, 2]")


class SlowWriter(ShardWriter):
    """Writes batch 0 only after batch 1 has been put: the writer thread must still keep the order."""

    def __init__(self, parts):
        super().__init__(parts, "jsonl", 0, [])
        parts.mkdir()
        self.second_put = threading.Event()

    def write(self, start, stop, rows):
        if start == 0:
            assert self.second_put.wait(10)
        return super().write(start, stop, rows)


def test_the_writer_thread_keeps_the_order_and_does_not_hold_the_caller(tmp_path):
    got = []
    writer = SlowWriter(tmp_path / "parts")
    sink = ShardSink(writer, got.append)
    sink.put(BatchDone(0, 0, 2, 0, []), rows(0, 2))  # returns at once although the write waits
    sink.put(BatchDone(1, 2, 4, 0, []), rows(2, 4))
    writer.second_put.set()
    for b in range(2, 10):
        sink.put(BatchDone(b, 2 * b, 2 * b + 2, 0, []), rows(2 * b, 2 * b + 2))
    sink.close()
    assert [m.index for m in got] == list(range(10))
    assert all(m.part["rows"] == 2 for m in got)


class FailingWriter(ShardWriter):
    def write(self, start, stop, rows):
        if start >= 2:
            raise RunFailure(f"rank 0 cannot write its shard {start}: No space left on device")
        return super().write(start, stop, rows)


def test_a_write_that_fails_is_raised_in_the_caller(tmp_path):
    got = []
    (tmp_path / "parts").mkdir()
    sink = ShardSink(FailingWriter(tmp_path / "parts", "jsonl", 0, []), got.append)
    sink.put(BatchDone(0, 0, 2, 0, []), rows(0, 2))
    sink.put(BatchDone(1, 2, 4, 0, []), rows(2, 4))
    with pytest.raises(RunFailure, match="No space left on device"):
        sink.close()  # the loop's thread learns it at the latest when it closes the sink
    with pytest.raises(RunFailure, match="No space left"):
        sink.put(BatchDone(2, 4, 6, 0, []), rows(4, 6))  # and at its next put
    assert [m.index for m in got] == [0]  # nothing after the failure went to rank 0


def test_the_end_single_file_or_shard_folder(tmp_path):
    for mode, expect in (("single", "res.jsonl"), ("sharded", "res")):
        out = Output(cfg(tmp_path / mode, f"output_mode={mode}"))
        j = out.journal({"input_sha256": "x", "n_records": 4})
        j.open(overwrite=False)
        token = out.share()
        got = []
        sink = out.sink(0, got.append)
        sink.put(BatchDone(0, 0, 4, 0, []), rows(0, 4))
        sink.close()
        j.commit(got)
        size = out.finish(j, 4)
        assert out.path.name == expect and size > 0 and not out.paths.parts.exists()
        if mode == "single":
            assert [json.loads(x) for x in out.path.read_text().splitlines()] == rows(0, 4)
        else:
            assert token and json.loads(out.paths.manifest.read_text())["records"] == 4
