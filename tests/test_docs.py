"""The docs tell the truth: every link resolves, the configuration page and the schema name the same keys with the
same defaults, every module has its row in docs/architecture.md, and the commands of README.md and docs/*.md pass
scripts/check_docs.py (statically for every page; the README's runnable blocks are run). Real runs, no mocks."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest
import yaml

from spmd_dp.config.schema import RunConfig
from spmd_dp.testing import REPO, clean_env

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
CHECKER = REPO / "scripts" / "check_docs.py"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def run(*args: str, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=clean_env({"PYTHONPATH": str(REPO)}),
                          capture_output=True, text=True, timeout=timeout)


def schema_keys() -> Dict[str, bool]:
    """Every key path of the schema -> whether it is a leaf a user sets (dataclass nodes are not)."""
    keys: Dict[str, bool] = {}

    def walk(cls: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                keys[path] = False
                walk(hints[f.name], path + ".")
            else:
                keys[path] = True

    walk(RunConfig, "")
    return keys


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation out, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> Set[str]:
    out: Set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            base, n = slug(line.lstrip("#")), 0
            while (base if n == 0 else f"{base}-{n}") in out:
                n += 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_every_link_resolves():
    broken: List[str] = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code blocks are not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}: {dest} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target}: no heading '#{anchor}' in {dest.name}")
    assert not broken, "\n".join(broken)


def test_readme_indexes_every_docs_page_and_stays_short():
    readme = (REPO / "README.md").read_text()
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall(readme)}
    missing = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not missing, f"README.md does not link these docs/ pages: {missing}"
    assert "### What's new / more" in readme
    assert len(readme.splitlines()) <= 220, "README.md is for a newcomer: keep it near 200 lines, details in docs/"


def configuration_rows() -> Dict[str, str]:
    """The keys of docs/configuration.md's tables -> their default cell."""
    rows: Dict[str, str] = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        m = re.match(r"^\| `([a-z][a-z0-9_.]*)` \| ([^|]*) \|", line)
        if m:
            assert m.group(1) not in rows, f"docs/configuration.md lists {m.group(1)} twice"
            rows[m.group(1)] = m.group(2).strip()
    return rows


def test_configuration_page_names_every_schema_key_and_only_those():
    documented = set(configuration_rows())
    keys = {k for k, leaf in schema_keys().items() if leaf}
    assert not keys - documented, f"keys in spmd_dp/config/schema.py missing from docs/configuration.md: " \
                                  f"{sorted(keys - documented)}"
    assert not documented - keys, f"keys in docs/configuration.md that the schema does not have: " \
                                  f"{sorted(documented - keys)}"


@pytest.fixture(scope="module")
def cfg_job() -> Dict[str, Any]:
    proc = run("-m", "spmd_dp", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_cfg_job_prints_every_key(cfg_job):
    """The docs send readers to `python -m spmd_dp --cfg job` for every key."""
    missing = []
    for key in schema_keys():
        node: Any = cfg_job
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"--cfg job does not print {missing}"


def test_configuration_defaults_are_the_runs_defaults(cfg_job):
    wrong = []
    for key, cell in configuration_rows().items():
        m = re.fullmatch(r"`([^`]*)`", cell)
        assert m, f"docs/configuration.md: the default of {key} must be one `literal`, got {cell!r}"
        documented = yaml.safe_load(m.group(1))
        actual: Any = cfg_job
        for part in key.split("."):
            actual = actual[part]
        same = documented == actual or (isinstance(actual, str) and isinstance(documented, str) and
                                        "/" in documented and actual.endswith("/" + documented))
        if not same:
            wrong.append(f"{key}: the page says {documented!r}, --cfg job says {actual!r}")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_its_row_in_architecture():
    text = (DOCS / "architecture.md").read_text()
    rows = set(re.findall(r"^\| `([\w/]+\.py)` \|", text, re.M))
    modules = {str(p.relative_to(REPO / "spmd_dp")) for p in (REPO / "spmd_dp").rglob("*.py")
               if p.read_text().strip() and "__pycache__" not in p.parts}
    assert not modules - rows, f"modules without a row in docs/architecture.md: {sorted(modules - rows)}"
    assert not rows - modules, f"rows in docs/architecture.md for modules that do not exist: {sorted(rows - modules)}"


def test_help():
    proc = run("-m", "spmd_dp", "--help")
    assert proc.returncode == 0 and "usage: torchrun --nproc-per-node=N -m spmd_dp" in proc.stdout, proc.stdout
    proc = run(str(CHECKER), "--help")
    assert proc.returncode == 0 and "--static" in proc.stdout, proc.stdout


def test_every_page_passes_the_static_checks():
    """bash -n, scripts and make targets that exist, keys of the schema; the commands that are not run here
    (GPU, cluster, network, slow) composed and validated as `--cfg job` would."""
    proc = run(str(CHECKER), "--static", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in PAGES:
        assert f"{page.relative_to(REPO)}: " in proc.stdout


def test_the_checker_finds_what_is_wrong(tmp_path: Path):
    """A page with a misspelt key in a GPU command, a runnable command that fails, and output that is not printed:
    each is reported, and the blocks that are right pass."""
    page = tmp_path / "page.md"
    page.write_text("""# A page

<!-- check: gpu (GPUs) -->
```bash
torchrun --nproc-per-node=4 -m spmd_dp engine_options.gpus_per_rank=2
```

```bash
python -m spmd_dp inference_engine=echo input_data_path=no/such/file.jsonl output_dir=out/x
```

```bash
echo "right here"
```
<!-- check: expect -->
```text
right here
```

```bash
echo "something else"
```
<!-- check: expect -->
```text
what the page promised
```

<!-- check: fast -->
```bash
true
```
""")
    proc = run(str(CHECKER), str(page), timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "'engine_options.gpus_per_rank' is not a key" in out
    lines = page.read_text().splitlines()

    def fence(first_line: str) -> int:
        """The line number (1-based) of the fence that opens the block whose first line this is."""
        return lines.index(first_line)

    failing = fence("python -m spmd_dp inference_engine=echo input_data_path=no/such/file.jsonl output_dir=out/x")
    assert re.search(rf"FAIL  .*page.md:{failing}: exit 2", out) and "no/such/file.jsonl does not exist" in out
    assert re.search(rf"ok    .*page.md:{fence('right here')}: expected output found", out)
    assert re.search(rf"FAIL  .*page.md:{fence('what the page promised')}: expected output not printed", out)
    assert "what the page promised" in out
    assert "unknown marker 'check: fast'" in out
    assert "page.md: 5 bash blocks, 4 failures" in out


def test_readme_commands_run():
    """The README's runnable blocks, run as written in a fresh copy of the repository (echo engine: seconds)."""
    proc = run(str(CHECKER), "README.md", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"ok    README.md:\d+: ran in", proc.stdout), proc.stdout
