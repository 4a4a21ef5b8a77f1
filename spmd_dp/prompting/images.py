"""Images in prompts: where a record's images are, their cheap check during the scan, and reading them on the rank that
generates the record.

A record names its images in chat content parts (`{"type": "image_url", "image_url": {"url": ...}}`, or the
Responses API's `{"type": "input_image", "image_url": ...}`) or in the field `image_field`. Each reference is:
  - a `data:` URL (`data:image/png;base64,...`);
  - a URL an fsspec backend reads (s3://, gs://, http(s)://, hf://, file://; storage_options apply);
  - base64 of the image's bytes (what a Parquet binary column becomes in a record: spmd_dp/inputs/tables.py), or
    the raw bytes decoded as text (a binary column whose bytes happened to be UTF-8: they hold a NUL byte);
  - a Hugging Face `Image` feature, `{"bytes": ..., "path": ...}` (the bytes when present, else the path);
  - else a path, relative to `data_dir` (if null: the working directory);
and the field may hold a list of them (several images).

What a reader would get wrong: nothing here decodes pixels or resizes. The scan (`check`) looks at a local file's
first bytes or an inline image's first bytes only; a remote image is first read when its record is generated
(a read per image at scan time is not cheap), so a bad remote image is refused then, as the engine refuses a record.
`load` reads the bytes and hands them on as `engines.base.Image`; the engine gives vLLM a PIL image of them.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from spmd_dp.config.paths import local_path
from spmd_dp.engines.base import IMAGE_PART, Image

PART_TYPES = ("image_url", "input_image")
FORMATS = "PNG, JPEG, GIF, WebP, BMP or TIFF"
HEAD = 16  # bytes the format check reads
LONG = 512  # a base64 string this long is bytes, not a path, whatever it holds
_B64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ImageError(ValueError):
    """An image reference that cannot be read as an image."""


def image_format(head: bytes) -> Optional[str]:
    """The format whose signature the first bytes carry (None: not one vLLM's image loader is known to read)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def part_reference(part: Dict[str, Any]) -> Any:
    """The reference an image content part holds (None: it has none)."""
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def field_references(value: Any) -> List[Any]:
    """The references a record's image field holds (one, or a list)."""
    return list(value) if isinstance(value, list) else [value]


def describe(ref: Any) -> str:
    """A reference as a message names it (never its bytes)."""
    if isinstance(ref, dict):
        return describe(ref["path"]) if not ref.get("bytes") and ref.get("path") else "inline image bytes"
    if not isinstance(ref, str):
        return type(ref).__name__
    if ref.startswith("data:"):
        return "data: URL"
    return ref if len(ref) <= 200 and _kind(ref) in ("url", "path") else "inline image bytes"


def _kind(ref: str) -> str:
    if ref.startswith("data:"):
        return "data"
    if "\x00" in ref:
        return "raw"
    if _URL.match(ref):
        return "url"
    if len(ref) >= 16 and len(ref) % 4 == 0 and _B64.fullmatch(ref[:4096].encode("ascii", "replace")) and \
            (len(ref) >= LONG or image_format(_b64_head(ref)) is not None):
        return "base64"
    return "path"


def _b64_head(text: str) -> bytes:
    try:
        return base64.b64decode(text[:24] + "=" * (-len(text[:24]) % 4))
    except (binascii.Error, ValueError):
        return b""


def _data_url(ref: str, head_only: bool) -> bytes:
    meta, sep, payload = ref[5:].partition(",")
    if not sep or not meta.endswith(";base64"):
        raise ImageError("a data: URL must be base64 (data:image/png;base64,...)")
    try:
        if head_only:
            head = payload[:24]
            return base64.b64decode(head + "=" * (-len(head) % 4), validate=True)
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data: URL's base64 is not valid ({e})") from None


class Images:
    """Resolves, checks and reads image references for one run (`data_dir`, fsspec `storage_options`)."""

    def __init__(self, data_dir: Optional[str], storage_options: Optional[Dict[str, Any]] = None,
                 limit: Optional[int] = None) -> None:
        self.data_dir = data_dir  # a relative path is read from it, else from the working directory
        self.storage_options = storage_options or {}
        self.limit = limit  # images a prompt may have (engine_options.limit_mm_per_prompt); None: no limit here

    def _path(self, ref: str) -> Path:
        return local_path(ref[len("file://"):] if ref.startswith("file://") else ref, self.data_dir)  # the one rule

    def _inline(self, ref: Any, head_only: bool) -> Tuple[Optional[bytes], Optional[str]]:
        """(bytes, None) for an inline image (head only if asked), (None, location) for one to read."""
        if isinstance(ref, dict):
            data, path = ref.get("bytes"), ref.get("path")
            if isinstance(data, str) and data and _kind(data) not in ("data", "base64", "raw"):
                data = data.encode("utf-8")  # bytes that were UTF-8 text (spmd_dp/inputs/tables.py)
            if data:
                ref = data
            elif isinstance(path, str) and path:
                ref = path
            else:
                raise ImageError("an image object must hold 'bytes' or a 'path' (a Hugging Face Image feature)")
        if isinstance(ref, (bytes, bytearray)):
            return bytes(ref[:HEAD] if head_only else ref), None
        if not isinstance(ref, str) or not ref:
            raise ImageError(f"an image is a path, a URL, a data: URL or base64 bytes, got {type(ref).__name__}")
        kind = _kind(ref)
        if kind == "data":
            return _data_url(ref, head_only), None
        if kind == "raw":
            return ref.encode("utf-8")[:HEAD if head_only else None], None
        if kind == "base64":
            return (_b64_head(ref) if head_only else base64.b64decode(ref)), None
        if kind == "url" and not ref.startswith("file://"):
            return None, ref
        return None, str(self._path(ref))

    def check(self, refs: List[Any]) -> Optional[str]:
        """Why these references are not images vLLM can be given (cheap: no remote read), or None."""
        if self.limit is not None and len(refs) > self.limit:
            return (f"the prompt has {len(refs)} images; engine_options.limit_mm_per_prompt={self.limit} allows "
                    f"{self.limit} (raise it, up to what the model takes)")
        for k, ref in enumerate(refs):
            try:
                head, where = self._inline(ref, head_only=True)
                if where is not None and not _URL.match(where):
                    try:
                        with open(where, "rb") as f:
                            head = f.read(HEAD)
                    except OSError as e:
                        raise ImageError(f"cannot read {where} ({e.strerror or e})") from None
                if head is not None and image_format(head) is None:
                    raise ImageError(f"not an image in a format vLLM reads ({FORMATS}): it starts with {head[:8]!r}")
            except ImageError as e:
                return f"image {k + 1} ({describe(ref)}): {e}"
        return None

    def load(self, ref: Any) -> Image:
        """The image's bytes, read here (the rank that generates the record); ImageError if it is not one."""
        data, where = self._inline(ref, head_only=False)
        if data is None:
            try:
                if _URL.match(where):
                    import fsspec

                    with fsspec.open(where, "rb", **self.storage_options) as f:
                        data = f.read()
                else:
                    with open(where, "rb") as f:
                        data = f.read()
            except (OSError, ValueError) as e:
                raise ImageError(f"cannot read {where} ({getattr(e, 'strerror', None) or e})") from None
        if image_format(data[:HEAD]) is None:
            raise ImageError(f"not an image in a format vLLM reads ({FORMATS}): it starts with {data[:8]!r}")
        return Image(data, describe(ref))

    def part(self, ref: Any) -> Dict[str, Any]:
        return {"type": IMAGE_PART, "image": self.load(ref)}


def image_limit(cfg) -> Optional[int]:
    """Images a prompt may hold: engine_options.limit_mm_per_prompt, else vLLM's own argument if given
    (+engine_options.vllm_kwargs.limit_mm_per_prompt.image=N); None: the model's own limit (vLLM checks it)."""
    eo = cfg.engine_options
    own = (eo.vllm_kwargs or {}).get("limit_mm_per_prompt")
    if isinstance(own, dict) and isinstance(own.get("image"), int):
        return own["image"]
    return eo.limit_mm_per_prompt

