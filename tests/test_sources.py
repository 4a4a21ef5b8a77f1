"""From data_dir + input_data_path to the sorted input files (spmd_dp/inputs/sources.py), on real folders: entries in
their order, a folder's or glob's files sorted, what is not input left out and said, a file matched twice refused,
and every failure to reach an input one line naming the URL and what to set."""

import gzip

import pytest

from spmd_dp.config import load_config
from spmd_dp.errors import UsageError
from spmd_dp.inputs import locations
from spmd_dp.inputs.sources import InputFile, open_file, resolve, storage_error


def test_locations_expand_home_and_join_urls(monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    assert locations("~/data", "in.jsonl") == ["/home/u/data/in.jsonl"]
    assert locations("/d", ["~/a.jsonl", "b/*.parquet", "s3://bkt/x/"]) == ["/home/u/a.jsonl", "/d/b/*.parquet",
                                                                           "s3://bkt/x/"]
    assert locations("s3://bkt/data", ["a.jsonl", "hf://datasets/o/n"]) == ["s3://bkt/data/a.jsonl",
                                                                          "hf://datasets/o/n"]
    cfg = load_config(["data_dir=~/data", "input_data_path=~/x.jsonl"])  # Hydra takes no unquoted '~': quoted for you
    assert (cfg.data_dir, cfg.input_data_path) == ("~/data", "~/x.jsonl")
    assert locations(cfg.data_dir, cfg.input_data_path) == ["/home/u/x.jsonl"]
    assert load_config(["input_data_path=[a.jsonl,b/*.parquet]"]).input_data_path == ["a.jsonl", "b/*.parquet"]


def tree(d):
    for name in ("b/2.jsonl", "b/10.jsonl", "b/sub/3.parquet", "b/.hidden.jsonl", "b/_SUCCESS", "b/README.md",
                 "b/notes.txt", "a.jsonl.gz", "c.json"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(b"x" * 3)
    return d


def test_entries_keep_their_order_and_each_ones_files_are_sorted(tmp_path):
    d = tree(tmp_path)
    files, notes = resolve([str(d / "b"), str(d / "a.jsonl.gz"), str(d / "c.json")])
    assert [f.url[len(str(d)) + 1:] for f in files] == ["b/10.jsonl", "b/2.jsonl", "b/sub/3.parquet", "a.jsonl.gz",
                                                         "c.json"]
    assert [(f.kind, f.compression, f.size) for f in files[2:]] == [("parquet", None, 3), ("jsonl", "gzip", 3),
                                                                    ("jsonl", None, 3)]  # a file named: JSONL
    assert notes == [f"{d / 'b'}: 2 files are not input and are left out (README.md, notes.txt)"]  # hidden, _: silent
    assert [f.url for f in resolve([str(d / "b" / "[0-9]*.jsonl")])[0]] == [str(d / "b/10.jsonl"), str(d / "b/2.jsonl")]
    forced, _ = resolve([str(d / "b")], input_format="jsonl")  # a forced format takes the folder's JSONL files only
    assert [f.url.rsplit("/", 1)[1] for f in forced] == ["10.jsonl", "2.jsonl"]
    assert InputFile.from_json(files[3].to_json()) == files[3]  # what rank 0 sends every rank


def test_a_file_matched_twice_is_refused(tmp_path):
    d = tree(tmp_path)
    with pytest.raises(UsageError) as e:
        resolve([str(d / "b" / "[0-9]*.jsonl"), str(d / "b" / "2.jsonl")])
    assert str(e.value) == (f"input error: {d}/b/2.jsonl is matched by both {d}/b/[0-9]*.jsonl and {d}/b/2.jsonl; "
                            f"list each input file once (a file read twice repeats its primary keys)")


@pytest.mark.parametrize("error,expected", [
    (PermissionError(13, "Permission denied"), "input error: s3://bkt/x.jsonl: access denied ([Errno 13] Permission "
                                               "denied); set AWS_ACCESS_KEY_ID"),
    (FileNotFoundError("nope"), "input error: s3://bkt/x.jsonl does not exist (nope); set data_dir="),
    (ConnectionRefusedError("refused"), "cannot reach the storage (refused); check the network and "
                                        "AWS_ENDPOINT_URL / +storage_options.endpoint_url"),
    (ImportError("no s3fs"), "reading s3:// needs the s3fs package: pip install 'spmd_dp[s3]'"),
    (RuntimeError("Unable to locate credentials"), "no credentials (Unable to locate credentials); set "
                                                   "AWS_ACCESS_KEY_ID"),
    (RuntimeError("boom\n  at line 3"), "cannot read it (RuntimeError: boom at line 3)"),
])
def test_failures_to_reach_an_input_are_one_line(error, expected):
    line = str(storage_error("s3://bkt/x.jsonl", error))
    assert expected in line and "\n" not in line


def test_open_file_decompresses_what_its_name_says(tmp_path):
    data = b'{"id": 1}\n{"id": 2}\n'
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    f = resolve([str(tmp_path / "a.jsonl.gz")])[0][0]
    with open_file(f) as fh:
        assert fh.readline() == b'{"id": 1}\n' and fh.read() == b'{"id": 2}\n'
    with pytest.raises(UsageError, match="no codec for nope"):
        open_file(InputFile(f"file://{tmp_path}/a.jsonl.gz", 1, "jsonl", "nope"))
