"""Which reader a file takes (spmd_dp/inputs/formats.py): by input_format, else by its extension; a file the user
named is read whatever its name, a folder's file only if it is input; compression by fsspec's suffixes."""

import pytest

from spmd_dp.inputs.formats import kind_of, reader_of, split_compression


@pytest.mark.parametrize("name,fmt,listed,expected", [
    ("a.jsonl", "auto", False, ("jsonl", None)),
    ("A.NDJSON", "auto", False, ("jsonl", None)),
    ("a.jsonl.gz", "auto", False, ("jsonl", "gzip")),
    ("a.jsonl.zst", "auto", False, ("jsonl", "zstd")),
    ("a.parquet", "auto", False, ("parquet", None)),
    ("data-00000-of-00002.arrow", "auto", False, ("arrow", None)),
    ("README.md", "auto", False, None),  # a folder's file that is not input
    ("records.txt", "auto", True, ("jsonl", None)),  # named by the user: read as JSONL
    ("a.json", "jsonl", False, ("jsonl", None)),  # input_format=jsonl takes .json files of a folder too
    ("a.parquet", "jsonl", False, None),  # ... and leaves a folder's other files out
    ("a.bin", "parquet", True, ("parquet", None)),  # a named file takes the format forced
    ("b.jsonl", "openai_batch", False, ("jsonl", None)),  # another format of JSON lines: the JSONL reader
    ("x.arrow", "hf_dataset", False, ("arrow", None)),
])
def test_the_reader_of_a_file(name, fmt, listed, expected):
    assert kind_of(name, fmt, listed) == expected


def test_formats_and_compression():
    assert reader_of("auto") is None and reader_of("parquet") == "parquet" and reader_of("hf_dataset") == "arrow"
    assert reader_of("openai_batch") == "jsonl"
    assert split_compression("x.jsonl.bz2") == ("x.jsonl", "bz2") and split_compression("x.jsonl") == ("x.jsonl", None)
