"""The input: files as users hold them (JSONL, Parquet, Hugging Face datasets; local or in object storage),
indexed by every rank together while the engines start, and read by batch.

  sources.py     data_dir + input_data_path (a file, folder, glob, URL, or a list) -> sorted input files (fsspec)
  formats.py     which reader a file takes (input_format=, or its extension)
  jsonl.py       JSON Lines: scanning a byte range, reading records from byte offsets
  tables.py      Parquet and Arrow (pyarrow): scanning row groups / record batches, reading rows
  records.py     what a valid record is (RecordSpec), a bad one (BadRecord), parsing a line
  duplicates.py  the duplicate-key check, partitioned by key hash over the ranks
  scan.py        the scan shared by all ranks: shares, merge, duplicates, bad records
  scanners.py    a rank's share scanned in processes forked before its engine starts
  index.py       the merged index every rank holds, and reading a batch through it

A record's identity is its position in the whole input (files in order, rows in file
order); it is its place in the output. Blank JSONL lines are not records; every other
line is one, valid or not, so a position never depends on validation.
"""

from spmd_dp.inputs.index import InputIndex, read_batch
from spmd_dp.inputs.records import BadRecord, RecordSpec
from spmd_dp.inputs.scan import ScanResult, scan_input, shared_scan
from spmd_dp.inputs.sources import InputFile, locations

__all__ = ["BadRecord", "InputFile", "InputIndex", "RecordSpec", "ScanResult", "locations",
           "read_batch", "scan_input", "shared_scan"]
