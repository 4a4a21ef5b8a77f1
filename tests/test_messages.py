"""The messages ranks send rank 0: typed, JSON on the wire, nothing unpickled."""

import json

import pytest

from spmd_dp.control.messages import BatchDone, RankState, RankStats, decode, encode


def test_round_trip_keeps_type_and_fields():
    sent = [BatchDone(3, 24, 32, 1, ['{"id": 1}', '{"id": "é"}'], [{"position": 30, "key": 9, "error": "x"}],
                      prompt_tokens=40, output_tokens=12, elapsed_s=1.5),
            RankStats(1, records=2, batches=1, engine_failed="no GPU")]
    data = encode(sent)
    assert decode(data) == sent
    assert [d["type"] for d in json.loads(data)] == ["batch", "stats"]  # plain JSON on the wire


def test_sizes_and_counts():
    b = BatchDone(0, 0, 3, 0, ["ab", "cde"])
    assert b.records == 2 and b.nbytes == 2 + 3 + 2  # newline-terminated lines
    assert RankStats(0).nbytes == 0


def test_unknown_message_type_is_refused():
    with pytest.raises(KeyError):
        decode(b'[{"type": "pickle", "payload": "..."}]')


def test_rank_states_travel_as_integers():
    assert [int(s) for s in RankState] == [0, 1, 2, 3] and RankState(2) is RankState.FAILED
    assert RankState(3) is RankState.GAVE_UP and RankState.GAVE_UP.out and not RankState.READY.out
