"""From `data_dir` + `input_data_path` to the sorted list of input files, through fsspec.

`input_data_path` is a file, a folder, a glob, or a list of them; each is relative to
`data_dir` (both may start with `~`) unless it is absolute or a URL (`s3://`, `gs://`,
`hf://`, `file://`: whatever fsspec protocol is installed; `storage_options` are passed
to it). Entries keep their order; the files one entry matches are sorted by path, except
a Hugging Face dataset folder (`save_to_disk`), whose Arrow files are in its `state.json`
order. A folder yields its input files (by extension, hidden and `_` files left out).
Every mistake is one `UsageError` line naming the place and the fix: nothing matched, a
listed file missing, a protocol whose fsspec package is missing, no credentials, an
unreachable endpoint.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import posixpath
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fsspec.core import url_to_fs

from spmd_dp.config.paths import local_path
from spmd_dp.errors import UsageError
from spmd_dp.inputs.formats import FOLDER_EXTENSIONS, kind_of

# protocol -> (fsspec package, spmd_dp extra, how to give it credentials)
PROTOCOLS = {
    "s3": ("s3fs", "s3", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                         "+storage_options.anon=true for a public bucket"),
    "gs": ("gcsfs", "gcs", "set GOOGLE_APPLICATION_CREDENTIALS (or run gcloud auth application-default login)"),
    "gcs": ("gcsfs", "gcs", "set GOOGLE_APPLICATION_CREDENTIALS (or run gcloud auth application-default login)"),
    "hf": ("huggingface_hub", "hf", "set HF_TOKEN (or run huggingface-cli login)"),
}
_ENDPOINT_HINT = {"s3": "AWS_ENDPOINT_URL / +storage_options.endpoint_url"}


@dataclass(frozen=True)
class InputFile:
    url: str  # what fsspec opens: an absolute local path or protocol://...
    size: int
    kind: str  # reader: jsonl | parquet | arrow
    compression: Optional[str] = None  # JSONL only: gzip, zstd, ... (fsspec's names)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "InputFile":
        return cls(**d)


def is_url(path: str) -> bool:
    return "://" in path


def locations(data_dir: Optional[str], input_data_path: Any) -> List[str]:
    """Each entry of input_data_path as a URL or an absolute local path: relative to data_dir if given, else to the
    working directory."""
    data_dir = data_dir or ""
    entries = list(input_data_path) if isinstance(input_data_path, (list, tuple)) else [input_data_path]
    out = []
    for entry in entries:
        entry = str(entry)
        if is_url(entry):
            out.append(entry)
        elif is_url(data_dir):
            out.append(posixpath.join(data_dir, os.path.expanduser(entry)))
        else:
            out.append(str(local_path(entry, data_dir)))  # the rule of every file option (spmd_dp/config/paths.py)
    return out


def filesystem(url: str, storage_options: Optional[Dict[str, Any]] = None) -> Tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL or local path (fsspec keeps one instance per options)."""
    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise storage_error(url, e) from None


def storage_error(url: str, e: BaseException) -> UsageError:
    """One line for a failure to reach an input: which URL, and the package or variable to set."""
    protocol = url.split("://", 1)[0] if is_url(url) else "file"
    local = protocol in ("file", "local")
    package, extra, credentials = PROTOCOLS.get(
        protocol, (None, None, "check its permissions" if local else "check the credentials of this storage"))
    text = " ".join(str(e).split()) or type(e).__name__
    names = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, ImportError) or "Install " in text or "not installed" in text:
        pkg = f"the {package} package: pip install 'spmd_dp[{extra}]'" if package else "its fsspec package"
        return UsageError(f"input error: {url}: reading {protocol}:// needs {pkg}")
    if isinstance(e, ValueError) and "protocol" in text.lower():
        return UsageError(f"input error: {url}: unknown protocol {protocol}:// ({text}); use a local path or an "
                          f"fsspec URL (s3://, gs://, hf://, file://)")
    if "NoCredentialsError" in names or "credentials" in text.lower():
        return UsageError(f"input error: {url}: no credentials ({text}); {credentials}")
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return UsageError(f"input error: {url}: access denied ({text}); {credentials}")
    if isinstance(e, FileNotFoundError):
        return UsageError(f"input error: {url} does not exist ({text}); set data_dir= and input_data_path= "
                          f"(absolute paths and URLs work too)")
    if names & {"EndpointConnectionError", "ConnectionError", "ClientConnectorError", "ConnectTimeoutError",
                "ReadTimeoutError", "TimeoutError", "ConnectionRefusedError", "gaierror"}:
        endpoint = _ENDPOINT_HINT.get(protocol, "the storage endpoint")
        return UsageError(f"input error: {url}: cannot reach the storage ({text}); check the network and "
                          f"{endpoint}")
    return UsageError(f"input error: {url}: cannot read it ({type(e).__name__}: {text}); {credentials}")


def read_error(url: str, e: BaseException, where: str = "") -> UsageError:
    """One line for an input file that could not be read through (decompression, truncation, I/O), naming it and
    where (`where`: ' past line 1230', ' at byte 4096', ' while reading a batch'). A truncated or corrupt file cannot
    be skipped record by record: the line says so."""
    if isinstance(e, UsageError):
        return e
    text = " ".join(str(e).split())[:200] or type(e).__name__
    if _broken_file(e):
        return UsageError(f"input error: {url}: cannot read it{where}: {type(e).__name__}: {text}; the file is "
                          f"truncated or corrupt: replace it (compress it again from the original) or leave it out of "
                          f"input_data_path (on_bad_record=skip skips bad records, not unreadable files)")
    error = storage_error(url, e)
    return UsageError(str(error).replace(f"{url}:", f"{url}{where}:", 1) if where else str(error))


def is_read_error(e: BaseException) -> bool:
    """An error of reading a file (I/O, decompression, truncation), as opposed to a bug."""
    return isinstance(e, (OSError, EOFError, zlib.error, lzma.LZMAError)) or _broken_file(e)


def _broken_file(e: BaseException) -> bool:
    """A decompression or truncation error (not the storage's: permissions, network)."""
    if isinstance(e, (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)) or "zstd" in type(e).__name__.lower():
        return True
    text = str(e).lower()
    return any(w in text for w in ("crc check", "invalid data stream", "not a gzipped", "compressed", "corrupt",
                                   "end-of-stream", "truncated"))


def _url(fs, path: str, like: str) -> str:
    """A path the filesystem returned, as the URL (or local path) any rank opens."""
    return fs.unstrip_protocol(path) if is_url(like) else path


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def resolve(locs: Sequence[str], input_format: str = "auto",
            storage_options: Optional[Dict[str, Any]] = None) -> Tuple[List[InputFile], List[str]]:
    """The input files, in input order, and notes for the log (files of a folder that are not input)."""
    files: List[InputFile] = []
    notes: List[str] = []
    seen: Dict[str, str] = {}
    for loc in locs:
        fs, path = filesystem(loc, storage_options)
        try:
            found = _expand(fs, loc, path, input_format, notes)
        except UsageError:
            raise
        except Exception as e:  # OSError, or botocore's / aiohttp's own errors
            raise storage_error(loc, e) from None
        for f in found:
            if f.url in seen:
                raise UsageError(f"input error: {f.url} is matched by both {seen[f.url]} and {loc}; list each "
                                 f"input file once (a file read twice repeats its primary keys)")
            seen[f.url] = loc
            files.append(f)
    return files, notes


def _expand(fs, loc: str, path: str, input_format: str, notes: List[str]) -> List[InputFile]:
    if _has_magic(path):
        matches = fs.glob(path, detail=True)
        out: List[InputFile] = []
        for p, info in sorted(matches.items()):
            if info.get("type") == "directory":
                out += _folder(fs, loc, p, input_format, notes)
            else:
                out.append(_file(fs, loc, p, info, input_format, listed=True))
        if not out:
            root = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
            fs.info(root)  # a missing bucket or folder is named as such (FileNotFoundError)
            raise UsageError(f"input error: {loc} matches no file; check data_dir= and input_data_path= (a file, "
                             f"a folder, a glob, or a list of them)")
        return out
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise UsageError(f"input error: {loc} does not exist; set data_dir= and input_data_path= (a relative "
                         f"path is read from data_dir if set, else the working directory; absolute paths and URLs "
                         f"work too)") from None
    if info.get("type") == "directory":
        return _folder(fs, loc, path, input_format, notes)
    return [_file(fs, loc, path, info, input_format, listed=True)]


def _file(fs, loc: str, path: str, info: Dict[str, Any], input_format: str, listed: bool) -> Optional[InputFile]:
    kind = kind_of(posixpath.basename(path), input_format, listed)
    if kind is None:
        return None
    reader, compression = kind
    url = _url(fs, path, loc)
    if compression and reader != "jsonl":
        raise UsageError(f"input error: {url}: a compressed {reader} file cannot be read; {reader} files compress "
                         f"their own columns: give the file uncompressed")
    return InputFile(url, int(info.get("size") or 0), reader, compression)


def _folder(fs, loc: str, path: str, input_format: str, notes: List[str]) -> List[InputFile]:
    path = path.rstrip("/")
    if fs.exists(f"{path}/dataset_dict.json"):
        splits = json.loads(fs.cat_file(f"{path}/dataset_dict.json")).get("splits", [])
        raise UsageError(f"input error: {loc} is a Hugging Face DatasetDict (splits: {', '.join(splits)}); give "
                         f"one split, e.g. input_data_path=.../{posixpath.basename(path)}/{(splits or ['train'])[0]}")
    if fs.exists(f"{path}/state.json") and fs.exists(f"{path}/dataset_info.json"):
        return _hf_dataset(fs, loc, path)
    found = fs.find(path, detail=True, withdirs=False)
    out, ignored = [], []
    for p, info in sorted(found.items()):
        rel = p[len(path):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        f = _file(fs, loc, p, info, input_format, listed=False)
        if f is None:
            ignored.append(rel)
        else:
            out.append(f)
    if ignored:
        notes.append(f"{loc}: {len(ignored)} files are not input and are left out ({', '.join(ignored[:3])}"
                     f"{', ...' if len(ignored) > 3 else ''})")
    if not out:
        raise UsageError(f"input error: {loc} is a folder with no input files ({FOLDER_EXTENSIONS}); give a file, "
                         f"a glob, or input_format=jsonl|parquet|hf_dataset")
    return out


def _hf_dataset(fs, loc: str, path: str) -> List[InputFile]:
    """A folder written by datasets.Dataset.save_to_disk: its Arrow files, in its state.json order."""
    try:
        state = json.loads(fs.cat_file(f"{path}/state.json"))
        names = [d["filename"] for d in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"input error: {loc}/state.json is not a Hugging Face dataset state ({e}); save the "
                         f"dataset again with Dataset.save_to_disk") from None
    out = []
    for name in names:
        p = f"{path}/{name}"
        try:
            info = fs.info(p)
        except FileNotFoundError:
            raise UsageError(f"input error: {_url(fs, p, loc)} is listed in {loc}/state.json but does not exist; "
                             f"save the dataset again with Dataset.save_to_disk") from None
        out.append(InputFile(_url(fs, p, loc), int(info.get("size") or 0), "arrow"))
    if not out:
        raise UsageError(f"input error: {loc} is a Hugging Face dataset with no data files")
    return out


class _Layers(io.BufferedReader):
    """A decompressing reader that also closes the file under it (gzip's does not)."""

    def __init__(self, stream, under) -> None:
        super().__init__(stream, buffer_size=1 << 16)
        self._under = under

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._under.close()


class _Zstd(io.RawIOBase):
    """zstd, decompressed frame after frame, that raises EOFError at a stream cut inside a frame (as gzip, bz2 and
    xz do; zstandard's stream reader just ends there, and a truncated file would pass for a short one)."""

    def __init__(self, raw) -> None:
        try:
            import zstandard
        except ImportError:
            raise UsageError("input error: reading .zst files needs zstandard: pip install 'spmd_dp[zstd]'") from None
        self.raw, self.new = raw, zstandard.ZstdDecompressor().decompressobj
        self.d, self.fed, self.out = self.new(), False, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.out:
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if self.fed and not self.d.eof:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return 0
            while chunk:
                if self.d.eof:  # the next frame
                    self.d, self.fed = self.new(), False
                self.out += self.d.decompress(chunk)
                self.fed = True
                chunk = self.d.unused_data if self.d.eof else b""
        n = min(len(b), len(self.out))
        b[:n] = self.out[:n]
        self.out = self.out[n:]
        return n


def open_file(f: InputFile, storage_options: Optional[Dict[str, Any]] = None, block_size: Optional[int] = None):
    """A buffered binary file object of an input file: local ones are Python's own (the fastest to read lines
    from); others are fsspec's (decompressed with fsspec's codecs when the name says so), behind
    io.BufferedReader's C readline."""
    if not is_url(f.url) and f.compression is None:
        return open(f.url, "rb")
    fs, path = filesystem(f.url, storage_options)
    raw = fs.open(path, "rb", **({"block_size": block_size} if block_size and is_url(f.url) else {}))
    if f.compression is None:
        return io.BufferedReader(raw, buffer_size=1 << 16)
    if f.compression == "zstd":
        return _Layers(_Zstd(raw), raw)
    from fsspec.compression import compr

    try:
        return _Layers(compr[f.compression](raw, mode="rb"), raw)
    except KeyError:
        raw.close()
        raise UsageError(f"input error: {f.url}: no codec for {f.compression} (pip install zstandard for .zst); "
                         f"or give the file uncompressed") from None
