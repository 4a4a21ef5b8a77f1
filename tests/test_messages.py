"""The messages ranks send rank 0 (spmd_dp/control/messages.py): typed, JSON on the wire, nothing unpickled; a
batch's size is what it carries (its lines, or in sharded mode only the metadata of the part its rank wrote)."""

import json

import pytest

from spmd_dp.control.messages import BatchDone, RankStats, decode, encode


def test_round_trip_keeps_type_and_fields():
    sent = [BatchDone(3, 24, 32, 1, ['{"id": 1}', '{"id": "é"}'], [{"position": 30, "key": 9, "error": "x"}],
                      prompt_tokens=40, output_tokens=12, elapsed_s=1.5),
            BatchDone(4, 32, 40, 1, [], part={"name": "part-x.jsonl", "bytes": 99, "crc32": 7, "rows": 8}),
            RankStats(1, records=2, batches=1, engine_failed="no GPU", engine_faults=["died: x"])]
    data = encode(sent)
    assert decode(data) == sent
    assert [d["type"] for d in json.loads(data)] == ["batch", "batch", "stats"]  # plain JSON on the wire


def test_a_batch_counts_its_records_and_bytes():
    lines = BatchDone(0, 0, 3, 0, ["ab", "cde"])
    assert lines.records == 2 and lines.nbytes == 2 + 3 + 2  # newline-terminated lines: what rank 0 writes
    shard = BatchDone(0, 0, 8, 0, [], part={"name": "p", "bytes": 4096, "crc32": 1, "rows": 8})
    assert shard.records == 8 and shard.nbytes == 0  # its rank wrote the rows: nothing of them travels
    assert RankStats(0, output_tokens=50, busy_s=2.0).output_tokens_per_s == 25.0
    assert RankStats(0, output_tokens=50).output_tokens_per_s == 0.0  # never busy: no rate, no division by zero


def test_unknown_message_type_is_refused():
    with pytest.raises(KeyError):
        decode(b'[{"type": "pickle", "payload": "..."}]')
