"""The one rule for a relative path in any file option: read from the option's own base directory when it has one
and it is given (`data_dir` for `input_data_path`, `prompts_dir` for `prompt_template`), else from the working
directory, as a shell would; `~` expands everywhere. Every message about a missing file names the directory looked in
(`looked_in`).

The rule covers input_data_path, prompt_template and prompts_dir, structured_outputs.json files, workflow, local
model folders (model_name), LoRA adapter folders, data_dir and output_dir. What a reader would get wrong: a base
directory that is itself relative is read from the working directory too (never from the package or the config file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

LOCAL_PREFIXES = ("/", "./", "../", "~")  # a name written as a path is a path, existing or not


def local_path(value: str, base: Optional[str] = None) -> Path:
    """`value` as an absolute path: from `base` (itself from the working directory) if given, else the working
    directory."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(base).expanduser() / path if base else path
    return Path(os.path.abspath(path))


def looked_in(base_key: Optional[str] = None, base: Optional[str] = None) -> str:
    """Where a relative path was read from, for a message: 'relative to prompts_dir=/x' or 'relative to the working
    directory /y'."""
    if base_key and base:
        return f"relative to {base_key}={local_path(base)}"
    return f"relative to the working directory {os.getcwd()}"


def names_a_path(name: str) -> bool:
    """A model or adapter name that is a local path: written as one, or an existing file or folder (vLLM and the
    Hugging Face libraries take an existing folder before a hub id of the same name)."""
    return name.startswith(LOCAL_PREFIXES) or local_path(name).exists()
