"""The merged index every rank holds (spmd_dp/inputs/index.py): records read by position across pieces and files,
however the files were cut; the resume fingerprint follows content, not place or time; what ranks exchange (the
locators) survives JSON; a file's checksum is the same however its pieces were cut (crc32_combine)."""

import json
import os
import random
import shutil
import zlib

import numpy as np

from spmd_dp.config import load_config
from spmd_dp.inputs import RecordSpec, scan_input
from spmd_dp.inputs import index as index_module
from spmd_dp.inputs.index import crc32_combine, locator_from_json, locator_to_json
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.testing import make_records, write_jsonl
from tests.helpers import RECORDS

TABLE_SPEC = RecordSpec("id", PromptBuilder(load_config([])).check, ("prompt", "messages"))


def test_crc32_combine_is_the_crc_of_the_concatenation():
    rng = random.Random(0)
    for _ in range(20):
        a, b = rng.randbytes(rng.randrange(0, 300)), rng.randbytes(rng.randrange(0, 300))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_locators_survive_json():
    offsets = np.array([0, 17, 2 ** 40 + 3], dtype=np.uint64)
    wire = json.loads(json.dumps(locator_to_json(offsets)))
    assert list(locator_from_json(wire)) == list(offsets)
    units = [[0, 64], [1, 36]]  # tables' units travel as they are
    assert locator_from_json(json.loads(json.dumps(locator_to_json(units)))) == units


def test_reads_cross_files_and_keep_few_open(tmp_path, monkeypatch):
    records = make_records(60)
    for k in range(6):
        write_jsonl(tmp_path / "in" / f"part-{k}.jsonl", records[k * 10:(k + 1) * 10])
    monkeypatch.setattr(index_module, "OPEN_FILES", 2)
    idx, _ = scan_input(tmp_path / "in", TABLE_SPEC, 3)
    assert idx.n_records == 60 and len(idx.files) == 6 and idx.size == sum(f.size for f in idx.files)
    assert idx.read(0, 60) == records
    assert idx.read(8, 23) == records[8:23] and idx.read(59, 60) == records[59:]
    assert len(idx._readers) <= 2  # the least recently used are closed
    assert idx.file_of(25).url.endswith("part-2.jsonl") and idx.piece_of(25).first == 20
    idx.close()
    assert idx._readers == {}


def test_the_fingerprint_follows_content_not_place_or_time(tmp_path):
    a = write_jsonl(tmp_path / "a" / "in.jsonl", RECORDS[:50])
    first = scan_input(a, TABLE_SPEC, 8)[0].content_sha256()
    os.utime(a, (1, 1))
    b = tmp_path / "b" / "in.jsonl"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert scan_input(b, TABLE_SPEC, 8)[0].content_sha256() == first  # moved, copied, touched: the same input
    assert scan_input(a, TABLE_SPEC, 32)[0].content_sha256() == first  # another batch_size: the same input
    b.write_text(b.read_text().replace('"w3 a b c', '"w3 a b x'))
    assert scan_input(b, TABLE_SPEC, 8)[0].content_sha256() != first  # same size, other content
    write_jsonl(tmp_path / "b" / "more.jsonl", [{"id": "x", "prompt": "y"}])
    assert scan_input(tmp_path / "b", TABLE_SPEC, 8)[0].content_sha256() != first  # another file in the set


def test_content_names_files_relative_to_their_folder(tmp_path):
    for d in ("x", "y"):
        write_jsonl(tmp_path / d / "in" / "a.jsonl", RECORDS[:5])
        write_jsonl(tmp_path / d / "in" / "b" / "c.jsonl", RECORDS[5:9])
    x, _ = scan_input(tmp_path / "x" / "in", TABLE_SPEC, 4)
    y, _ = scan_input(tmp_path / "y" / "in", TABLE_SPEC, 4)
    assert [c[0] for c in x.content()] == ["a.jsonl", "b/c.jsonl"] and x.content() == y.content()
    assert x.digest() != y.digest()  # what a rank reads by names the files themselves
