"""Which reader a file takes: by `input_format=`, else by its extension.

Three readers: `jsonl` (JSON Lines, also gzip/zstd/bz2/xz-compressed through fsspec),
`parquet` and `arrow` (the Arrow IPC files of a Hugging Face dataset saved with
`datasets.Dataset.save_to_disk`), the last two through pyarrow (spmd_dp/inputs/tables.py).
An `input_format` that is not one of them is JSON Lines records that the prompt layer
reads its own way (e.g. OpenAI Batch API request lines): it takes the JSONL reader, so
such a format needs no reader of its own.
"""

from __future__ import annotations

from typing import Optional, Tuple

from fsspec.utils import infer_compression

READER_OF_FORMAT = {"jsonl": "jsonl", "parquet": "parquet", "hf_dataset": "arrow"}  # else: JSONL records
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
FOLDER_EXTENSIONS = "'.jsonl' (also .gz, .zst), '.ndjson', '.parquet', '.arrow'"


def reader_of(input_format: str) -> Optional[str]:
    """The reader every file takes under input_format (None: auto, by extension)."""
    return None if input_format == "auto" else READER_OF_FORMAT.get(input_format, "jsonl")


def split_compression(name: str) -> Tuple[str, Optional[str]]:
    """('data.jsonl', 'gzip') for 'data.jsonl.gz': fsspec's own table of compression suffixes."""
    compression = infer_compression(name)
    return (name.rsplit(".", 1)[0], compression) if compression else (name, None)


def kind_of(name: str, input_format: str, listed: bool) -> Optional[Tuple[str, Optional[str]]]:
    """(reader, compression) of a file, or None if a folder's file is not input (README.md, _SUCCESS, ...).

    listed: the user named the file itself or by a glob; any such file is read (JSONL unless its
    extension or input_format says otherwise), as spmd_dp always read the one file it was given."""
    base, compression = split_compression(name.lower())
    ext = "." + base.rsplit(".", 1)[-1] if "." in base else ""
    by_ext = EXTENSIONS.get(ext)
    forced = reader_of(input_format)
    if forced is not None:
        if listed or by_ext == forced or (forced == "jsonl" and ext == ".json"):
            return forced, compression
        return None
    if by_ext is not None:
        return by_ext, compression
    return ("jsonl", compression) if listed else None
