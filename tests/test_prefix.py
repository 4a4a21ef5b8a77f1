"""Prefix affinity, piece by piece: the prefix key (after templates and chat), the record order built from the keys,
batches and claims that keep a group together, and reading a batch's scattered records. No process group: the
claims go through a real c10d HashStore, the scan through the real scanner (one rank, LocalGroup)."""

import itertools
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist

from spmd_dp.config import load_config
from spmd_dp.control.claims import TAIL_K, Claims, dynamic_batches, make_batches, static_batches
from spmd_dp.control.groups import MAX_RUN_BATCHES, costs
from spmd_dp.control.messages import RankState
from spmd_dp.inputs import RecordSpec, locations, shared_scan
from spmd_dp.inputs.order import AUTO_GAIN, RecordOrder, build
from spmd_dp.inputs.prefixes import LEVELS, PrefixList, payload
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.testing import doc_qa_records, write_jsonl

READY2 = [RankState.READY] * 2


def keyed(overrides, record):
    """A record's (why, key bytes) as the scan takes them."""
    return PromptBuilder(load_config(overrides)).check_keyed(record)


def ladder(data):
    pl = PrefixList()
    pl.add(0, data)
    pl.to_bytes()  # (the hashes are computed for many records at once)
    return list(pl.hashes)


# -- the key ------------------------------------------------------------------------------------------------
def test_the_key_is_the_prompt_after_the_template(tmp_path):
    tpl = tmp_path / "qa.jinja"
    tpl.write_text("Read this.\n{{ doc }}\nQuestion: {{ q }}")
    a = keyed([f"prompt_template={tpl}"], {"id": 1, "doc": "D" * 600, "q": "what?"})
    b = keyed([f"prompt_template={tpl}"], {"id": 2, "doc": "D" * 600, "q": "why?"})
    assert a[0] is None and a[1].startswith(b"Read this.\n" + b"D" * 600 + b"\nQuestion: what?")
    la, lb = ladder(a[1]), ladder(b[1])
    assert len(la) == len(lb) == 2 and la == lb  # 617+ bytes: levels 256 and 512, both inside the shared part
    c = keyed([f"prompt_template={tpl}"], {"id": 3, "doc": "E" + "D" * 599, "q": "what?"})
    assert ladder(c[1])[0] != la[0]  # another document: another key from the first level on


def test_the_key_of_a_chat_has_its_system_prompt_and_roles():
    why, data = keyed(["chat=true", "system_prompt=Be brief."], {"id": 1, "prompt": "hello"})
    assert why is None and data == "system\x1fBe brief.\x1euser\x1fhello".encode()
    msgs = [{"role": "system", "content": "S" * 300}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    why, data = keyed([], {"id": 1, "messages": msgs})
    assert data == ("system\x1f" + "S" * 300 + "\x1euser\x1fhi").encode()
    assert ladder(data)[0] == ladder(("system\x1f" + "S" * 300 + "\x1euser\x1fbye").encode())[0]


def test_token_ids_and_prefix_field_and_bad_records():
    why, data = keyed([], {"id": 1, "prompt": list(range(100))})
    assert data == np.arange(100, dtype="<u4").tobytes()  # 400 bytes: one level (64 tokens)
    assert len(ladder(data)) == 1
    why, data = keyed(["prefix_field=doc_id"], {"id": 1, "prompt": "x", "doc_id": 7})
    assert data == b"7"
    assert keyed(["prefix_field=doc_id"], {"id": 1, "prompt": "x"}) == (None, None)  # no field: no group
    why, data = keyed([], {"id": 1})
    assert why and data is None  # a bad record has no key


@pytest.mark.parametrize("buffer", [1 << 20, 4096])
def test_the_hashes_do_not_depend_on_the_company_they_are_computed_in(monkeypatch, buffer):
    from spmd_dp.inputs import prefixes

    rng = random.Random(5)
    prompts = [bytes(rng.randrange(256) for _ in range(rng.randrange(200, 5000))) for _ in range(60)]
    alone = [h for p in prompts for h in ladder(p)]
    monkeypatch.setattr(prefixes, "BUFFER_BYTES", buffer)  # 4096: a flush every few records, big ones alone
    together = PrefixList()
    for i, p in enumerate(prompts):
        together.add(i, p)
    together.to_bytes()
    assert list(together.hashes) == alone and len(set(alone)) == len(alone)
    assert list(together.counts) == [sum(1 for length in LEVELS if length <= len(p)) for p in prompts if len(p) >= 256]


def test_the_ladder_levels():
    shared = b"x" * 700
    a, b = ladder(shared + b"a" * 300), ladder(shared + b"b" * 300)
    assert len(a) == len(b) == LEVELS.index(768) + 1 + 0  # 1000 bytes: levels 256, 512, 768
    assert a[:2] == b[:2] and a[2] != b[2]  # they share 700 bytes: equal up to 512, not at 768
    assert ladder(b"y" * 255) == []  # shorter than the first level: no key
    whole = PrefixList(whole=True)
    whole.add(0, b"doc-1")
    whole.add(1, b"doc-1")
    whole.add(2, b"doc-2")
    whole.add(3, b"")
    whole.to_bytes()
    h = list(whole.hashes)
    assert len(whole) == 4 and h[0] == h[1] and len(set(h)) == 3 and whole.weight == 4


# -- the order ----------------------------------------------------------------------------------------------
def order_of(prompts, mode="auto", whole=False):
    """The record order of these prompts (bytes), as rank 0 builds it from one rank's keys."""
    pl = PrefixList(whole)
    for i, p in enumerate(prompts):
        pl.add(i, p)
    return build(len(prompts), [payload({0: pl}, {0: 0})], whole, mode)


def qa_prompts(docs=6, questions=4, seed=0, shuffle=True):
    recs = doc_qa_records(docs, questions, doc_len=80, seed=seed, shuffle=shuffle)
    return recs, [r["prompt"].encode() for r in recs]


def test_the_grouped_order_keeps_each_document_together_in_first_seen_order():
    recs, prompts = qa_prompts()
    order = order_of(prompts)
    assert order.permuted and order.grouped
    docs = [recs[p]["doc_id"] for p in order.perm]
    runs = [d for d, _ in itertools.groupby(docs)]
    assert len(runs) == 6 and sorted(runs) == list(range(6))  # each document once, whole
    first_seen = list(dict.fromkeys(r["doc_id"] for r in recs))
    assert runs == first_seen  # groups in the order their first record comes
    for d in range(6):  # within a group, input order
        mine = [p for p in order.perm.tolist() if recs[p]["doc_id"] == d]
        assert mine == sorted(mine)
    assert sorted(order.perm.tolist()) == list(range(len(recs)))
    assert order.stats["groups"] == 6 and order.stats["largest"] == 4
    # sharing: what a slot shares with the slot before it; zero exactly where a document starts
    starts = [j for j in range(len(docs)) if j == 0 or docs[j] != docs[j - 1]]
    assert [j for j in range(len(docs)) if order.sharing[j] == 0] == starts
    again = order_of(prompts)
    assert np.array_equal(again.perm, order.perm) and again.digest() == order.digest()  # deterministic


def test_no_shared_prefix_or_an_input_already_grouped_keeps_input_order():
    rng = random.Random(1)
    unique = [bytes(rng.randrange(256) for _ in range(600)) for _ in range(50)]
    order = order_of(unique)
    assert not order.permuted and not order.grouped and order.digest() is None
    assert order.positions(3, 6) == [3, 4, 5]
    recs, prompts = qa_prompts(shuffle=False)
    order = order_of(prompts)
    assert not order.permuted and order.grouped  # input order, but the claims still keep documents together
    assert order_of(prompts, mode=True).perm is None  # nothing to move even when asked


def test_auto_needs_a_gain_true_does_not():
    rng = random.Random(2)
    unique = [bytes(rng.randrange(256) for _ in range(2000)) for _ in range(100)]
    pair = unique[7][:300] + b"-other"
    prompts = unique + [pair]  # one record shares 256 bytes with record 7: far below AUTO_GAIN
    auto, forced = order_of(prompts), order_of(prompts, mode=True)
    assert forced.stats["shared"] - forced.stats["input_shared"] < AUTO_GAIN
    assert not auto.permuted and forced.permuted
    assert forced.perm.tolist()[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 100]  # the sharer moves next to record 7
    assert order_of(prompts, mode="claims").perm is None  # a compressed input is never read out of order


def test_a_trie_keeps_documents_together_under_a_system_prompt_shared_by_all():
    system = b"S" * 1300  # shared by every record: levels 256..1024 group all of them
    recs, prompts = qa_prompts(docs=5, questions=3)
    order = order_of([system + p for p in prompts])
    docs = [recs[p]["doc_id"] for p in order.perm]
    assert len([d for d, _ in itertools.groupby(docs)]) == 5  # one document after another inside the one big group


def test_prefix_field_groups_by_value():
    values = [b"a", b"b", b"a", b"c", b"b", b"a"]
    order = order_of(values, mode=True, whole=True)
    assert order.perm.tolist() == [0, 2, 5, 1, 4, 3]


def test_the_order_travels_as_bytes():
    _, prompts = qa_prompts()
    order = order_of(prompts)
    back = RecordOrder.from_bytes(order.to_bytes())
    assert np.array_equal(back.perm, order.perm) and np.array_equal(back.sharing, order.sharing)
    assert back.stats == order.stats and back.digest() == order.digest()


def test_the_scan_takes_the_keys_and_reads_a_batch_of_scattered_records(tmp_path):
    recs = doc_qa_records(7, 5, doc_len=60, seed=3)
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    cfg = load_config([])
    prompts = PromptBuilder(cfg)
    spec = RecordSpec("id", prompts.check, None, prompts.check_keyed)
    result = shared_scan(locations("", [str(inp)]), "auto", spec, 4)  # offsets every 4 records
    order = result.order
    assert order.permuted and order.stats["keyed"] == 35
    for start in range(0, 35, 6):  # any span of slots reads as the records at their positions
        stop = min(start + 6, 35)
        assert order.read(result.index, start, stop) == [recs[p] for p in order.positions(start, stop)]
    off = shared_scan(locations("", [str(inp)]), "auto", RecordSpec("id", prompts.check), 4)
    assert off.order.stats.get("off") and not off.order.permuted
    # Parquet, several row groups: a piece's units are decoded once per read
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "in.parquet", row_group_size=6)
    table = shared_scan(locations("", [str(tmp_path / "in.parquet")]), "auto", spec, 4)
    assert np.array_equal(table.order.perm, order.perm)
    assert table.index.read_positions([0, 5, 6, 20, 34]) == [recs[p] for p in (0, 5, 6, 20, 34)]


def test_forked_scanners_take_the_keys_the_rank_would(tmp_path):
    from spmd_dp.inputs.duplicates import KeyList
    from spmd_dp.inputs.scan import Piece, _scan_piece
    from spmd_dp.inputs.scanners import Scanners
    from spmd_dp.inputs.sources import resolve

    inp = write_jsonl(tmp_path / "in.jsonl", doc_qa_records(9, 4, doc_len=80, seed=6))
    files, _ = resolve([str(inp)])
    size = files[0].size
    pieces = [(k, Piece(0, s, min(s + 4000, size))) for k, s in enumerate(range(0, size, 4000))]
    prompts = PromptBuilder(load_config([]))
    spec = RecordSpec("id", prompts.check, None, prompts.check_keyed)
    scanners = Scanners(spec, 16, None, processes=2)
    try:
        got = scanners.scan(files, pieces, rank=0)
    finally:
        scanners.close()
    for (i, _, _, _, theirs), (_, piece) in zip(got, pieces):
        _, own = _scan_piece(piece, files[0], spec, 16, KeyList(), [], None)
        assert theirs.to_bytes() == own.to_bytes() and len(own)


# -- batches and claims -------------------------------------------------------------------------------------
def grouped_sharing(sizes):
    """sharing of slots laid out as consecutive groups of these sizes (2 levels inside a group, 0 at its start)."""
    out = []
    for s in sizes:
        out += [0] + [2] * (s - 1)
    return np.array(out, dtype=np.uint8)


def groups_of(sizes):
    return [g for g, s in enumerate(sizes) for _ in range(s)]


@pytest.mark.parametrize("world,bs", [(1, 8), (2, 8), (3, 4), (4, 32)])
def test_runs_keep_groups_whole_and_cover_the_work(world, bs):
    rng = random.Random(world * 100 + bs)
    sizes = [rng.randint(1, 12) for _ in range(120)]
    sharing, group = grouped_sharing(sizes), groups_of(sizes)
    n = len(group)
    batches = dynamic_batches([(0, n)], bs, world, sharing)
    assert sorted(i for b in batches for i in range(b.start, b.stop)) == list(range(n))
    assert all(1 <= b.size <= bs for b in batches) and [b.index for b in batches] == list(range(len(batches)))
    runs = {}
    for b in batches:
        runs.setdefault(b.run, []).append(b)
    owner = {}
    for run, bs_ in runs.items():
        assert [b.index for b in bs_] == list(range(bs_[0].index, bs_[-1].index + 1))  # consecutive
        for b in bs_:
            for i in range(b.start, b.stop):
                owner.setdefault(group[i], set()).add(run)
    split = [g for g, r in owner.items() if len(r) > 1]
    assert all(sizes[g] > bs for g in split)  # a group that fits a batch (the least a run holds) is never cut
    for g in split:  # a larger one only in the tail, where runs shrink below it: (records left) / (TAIL_K x N)
        left = n - group.index(g)
        assert left < sizes[g] * TAIL_K * world
    sizes_by_run = [sum(b.size for b in r) for r in runs.values()]
    assert sizes_by_run[-1] <= max(bs, 12)  # the tail: runs shrink to about a batch


def test_a_group_larger_than_a_run_is_cut_in_as_few_places_as_possible():
    sizes = [3000, 5, 5]
    sharing = grouped_sharing(sizes)
    batches = dynamic_batches([(0, 3010)], 8, 2, sharing)
    runs, p = sorted({b.run for b in batches}), 0
    for r in runs:
        size = sum(b.size for b in batches if b.run == r)
        cap = min(max(-(-(3010 - p) // (TAIL_K * 2)), 8), MAX_RUN_BATCHES * 8)
        if p + cap < 3000:  # inside the big group every cut costs the same: the longest run allowed, whole batches
            assert size == cap // 8 * 8
        p += size
    assert p == 3010
    assert sum(b.size for b in batches if b.run == runs[0]) == MAX_RUN_BATCHES * 8


def test_runs_shrink_like_guided_self_scheduling():
    sharing = np.zeros(4000, dtype=np.uint8)  # nothing shared: every cut is free
    batches = dynamic_batches([(0, 4000)], 8, 4, sharing)
    sizes = [sum(b.size for b in batches if b.run == r) for r in sorted({b.run for b in batches})]
    cap = -(-4000 // (TAIL_K * 4))  # the first run: guided self-scheduling's share of everything
    assert cap // 2 <= sizes[0] <= cap and sizes[0] % 8 == 0  # a whole number of batches where cuts are free
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] <= 8


def test_costs_across_a_committed_gap_are_the_least_shared_in_between():
    sharing = np.array([0, 3, 3, 1, 3, 3, 0, 2], dtype=np.uint8)
    assert costs([(0, 2), (5, 8)], sharing).tolist() == [0, 3, 1, 0, 2]  # slots 0,1 | 5,6,7: 1->5 shares min(3,1,3,3)


def test_static_shares_end_between_groups_and_stay_balanced():
    sizes = [7] * 60  # 420 records over 4 ranks: 105 each, group boundaries every 7
    sharing = grouped_sharing(sizes)
    batches = static_batches([(0, 420)], 4, 16, sharing)
    share = {r: [i for b in batches if b.owner == r for i in range(b.start, b.stop)] for r in range(4)}
    for r in range(4):
        assert share[r][0] % 7 == 0 or r == 0  # each share starts a group
        assert abs(len(share[r]) - 105) <= 105 * 0.05 + 1
    assert sorted(i for s in share.values() for i in s) == list(range(420))
    assert make_batches("static", [(0, 420)], 4, 16) == static_batches([(0, 420)], 4, 16)  # no sharing: the seed's


def test_a_rank_claims_a_run_and_takes_its_batches_before_new_work():
    store = dist.HashStore()
    sizes = [20] * 10  # 200 records in groups of 20, batches of 8
    batches = dynamic_batches([(0, 200)], 8, 2, grouped_sharing(sizes))
    r0, r1 = Claims(store, batches, "dynamic", 0, 2), Claims(store, batches, "dynamic", 1, 2)
    first = r0.next(READY2)
    assert first.index == 0 and r0.local and all(b.run == first.run for b in r0.local)
    mine = [first] + list(r0.local)
    other = r1.next(READY2)
    assert other.run != first.run and other.index == mine[-1].index + 1  # the next run, not the rest of r0's
    assert r0.target(64, 8, reported=2) == 72  # the rest of a run is this rank's: an engine-full
    taken = [r0.next(READY2) for _ in range(len(mine) - 1)]
    assert taken == mine[1:]
    # hand-back: what it holds and the rest of its run go to the other rank, before new work
    r1_rest = list(r1.local)
    given = r1.give_back([other])
    assert given == [other] + r1_rest and not r1.local
    got = [r0.next(READY2) for _ in range(len(given))]
    assert got == given
    seen = {b.index for b in mine + given}
    while (b := r0.next(READY2)) is not None or (b := r1.next(READY2)) is not None:
        assert b.index not in seen
        seen.add(b.index)
    assert seen == set(range(len(batches)))  # every batch once


def test_claims_without_grouping_are_todays():
    batches = dynamic_batches([(0, 100)], 8)
    assert [b.run for b in batches] == [b.index for b in batches]
    store = dist.HashStore()
    c = Claims(store, batches, "dynamic", 0, 2)
    assert c.next(READY2).index == 0 and not c.local and c.next(READY2).index == 1


def test_the_journal_keeps_positions_and_the_fingerprint_the_grouping(tmp_path):
    from spmd_dp.control.messages import BatchDone
    from spmd_dp.output.journal import Journal, fingerprint
    from spmd_dp.output.paths import OutputPaths

    cfg = load_config([f"output_dir={tmp_path}", "name=j"])
    paths = OutputPaths.of(cfg)
    assert "prefix_affinity" not in fingerprint(cfg, "x", 3) and "record_order" not in fingerprint(cfg, "x", 3)
    fp = fingerprint(cfg, "x", 3, record_order="abc")
    j = Journal(paths, fp)
    j.open(False)
    j.commit([BatchDone(0, 0, 2, 0, ['{"a": 2}', '{"a": 0}'], positions=[0, 2])])
    j.close()
    again = Journal(paths, fp)
    again.open(False)
    assert again.positions_of(0) == [0, 2] and again.committed_spans() == [(0, 2)]
    again.close()
    changed = Journal(paths, fingerprint(load_config([f"output_dir={tmp_path}", "name=j", "prefix_affinity=false"]),
                                         "x", 3))
    with pytest.raises(Exception, match="prefix_affinity, record_order changed"):
        changed.open(False)
