"""The duplicate-key check partitioned by key hash (spmd_dp/inputs/duplicates.py), over simulated ranks: every later
copy of a key is found once and names the first copy, keys of different types differ, no rank holds every key."""

from spmd_dp.inputs.duplicates import KeyList, find_duplicates, outgoing
from spmd_dp.inputs.records import encode_key


def test_duplicates_found_by_hash_partition_over_simulated_ranks():
    """Keys scanned by 3 ranks, sent to the rank owning their hash: every later copy is found once, naming the
    first copy; no rank receives every key."""
    keys = [f"k{i % 97}" if i % 5 == 0 else i for i in range(600)]  # k0..k96 repeat; ints are unique
    keys[599] = "599"  # a string, not the integer 599 ... which is not there either: unique
    keys[598] = 7  # the integer 7 again
    world, per_piece = 3, 50
    sent = {r: [] for r in range(world)}
    for piece in range(12):  # pieces of 50 keys; rank = piece // 4
        kl = KeyList()
        for j in range(per_piece):
            kl.add(encode_key(keys[piece * per_piece + j]), j, j + 1)
        for dst, payload in enumerate(outgoing({piece: kl}, {piece: piece * per_piece}, {piece: 1000 * piece}, world)):
            sent[dst].append(payload)
    found = sorted(d for dst in range(world) for d in find_duplicates(sent[dst]))
    expected, first = [], {}
    for pos, k in enumerate(keys):
        line = 1000 * (pos // per_piece) + pos % per_piece + 1
        if (type(k), k) in first:
            expected.append((pos, line, *first[(type(k), k)], encode_key(k)))
        else:
            first[(type(k), k)] = (pos, line)
    assert found == expected and len(found) == 120 - 97 + 1
    assert max(sum(len(p) for p in sent[r]) for r in range(world)) < 0.6 * sum(len(p) for r in sent for p in sent[r])


def test_a_world_of_one_and_empty_pieces():
    kl = KeyList()
    for j, k in enumerate(["a", "b", "a", 1, "1", "a"]):
        kl.add(encode_key(k), j, 10 + j)
    empty = KeyList()
    assert len(kl) == 6 and len(empty) == 0
    keylists = {0: kl, 1: empty}
    (payload,) = outgoing(keylists, {0: 100, 1: 106}, {0: 0, 1: 0}, 1)
    assert keylists == {}  # each piece's keys are let go of as the payloads are made
    assert find_duplicates([payload]) == [(102, 12, 100, 10, b"sa"), (105, 15, 100, 10, b"sa")]
    assert find_duplicates([b"", b""]) == []  # no keys at all
