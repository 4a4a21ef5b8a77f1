"""Check that every command in README.md and docs/*.md runs as written.

    python scripts/check_docs.py                     # every page: static checks, then run the runnable blocks
    python scripts/check_docs.py README.md           # one page
    python scripts/check_docs.py --static            # static checks only (seconds; tests/test_docs.py runs this)
    python scripts/check_docs.py --slow              # also the blocks marked slow (real vLLM on CPU, minutes)

What a page's ```bash blocks are, by the marker on the line before the fence (an HTML comment, not shown
when the page is rendered):

    (none)                            runnable on a CPU machine in seconds: run
    <!-- check: error (why) -->       runnable, and shows a mistake on purpose (a misspelt key): run it, but skip
                                      the static check of its keys (the block itself must exit 0: `|| echo ...`)
    <!-- check: slow (why) -->        minutes (real vLLM on CPU, the test suite, a benchmark): run with --slow
    <!-- check: gpu (why) -->         needs GPUs: never run here
    <!-- check: cluster (why) -->     needs Slurm or several nodes: never run here
    <!-- check: network (why) -->     needs the network, a bucket or credentials: never run here
    <!-- check: expect -->            on a ```text block: each of its lines must be in the output of the bash
                                      block before it (checked when that block ran)

Static checks, every bash block: `bash -n`; every `scripts/...` path exists; every `make TARGET` is a target of
the Makefile; every spmd_dp override (`torchrun ... -m spmd_dp`, `python -m spmd_dp`, the launch scripts) names a
key of the schema (or a preset group). Blocks that are not run are also composed and validated as a run would
(`python -m spmd_dp --cfg job ARGS`, from the repository's root): their keys and values are checked.

Running: each page gets a fresh copy of the repository (its tracked and untracked, not ignored files) in a temp
folder, with `.venv` linking to this interpreter's virtualenv; its runnable blocks run there in order, each as
one `bash -e -o pipefail` script, with the virtualenv's bin first on PATH, the copy on PYTHONPATH, no launcher
variables and HF_HUB_OFFLINE=1 (a command that needs the network must say so). A block fails when it exits
non-zero or runs past --timeout. Exit code: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's spmd_dp, whatever is installed

from spmd_dp.testing import clean_env as launcher_free_env  # noqa: E402  (no torch: cheap)

KINDS = ("run", "error", "slow", "gpu", "cluster", "network")
MARKER = re.compile(r"^\s*<!--\s*check:\s*(\w+)\b(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(```|~~~)\s*([\w+-]*)")
LAUNCH_SCRIPTS = ("run_local.sh", "run_multinode.sh", "slurm.sbatch")
PRESET_GROUPS = ("model", "hardware")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    kind: str  # run | slow | gpu | cluster | network (bash); expect | "" (other languages)
    reason: str = ""
    output: Optional[str] = None  # what it printed, once run

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"


@dataclass
class Report:
    failures: List[str] = field(default_factory=list)
    lines: List[str] = field(default_factory=list)

    def ok(self, msg: str) -> None:
        self.lines.append(f"  ok    {msg}")

    def skip(self, msg: str) -> None:
        self.lines.append(f"  skip  {msg}")

    def fail(self, msg: str, detail: str = "") -> None:
        self.failures.append(msg)
        self.lines.append(f"  FAIL  {msg}" + (f"\n{_indent(detail)}" if detail else ""))


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def _indent(text: str, n: int = 8) -> str:
    return "\n".join(" " * n + line for line in text.rstrip().splitlines())


# -- reading pages ---------------------------------------------------------------------------------------
def parse_blocks(page: Path) -> List[Block]:
    """The fenced blocks of a page, with the marker of the line before each (indented fences too)."""
    lines = page.read_text().splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start = i
        body: List[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        kind, reason = (marker.group(1), marker.group(2).strip(" ()")) if marker else ("", "")
        if lang in ("bash", "sh", "shell"):
            kind = kind or "run"
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", kind, reason))
    return blocks


def commands(script: str) -> List[List[str]]:
    """The simple commands of a bash block as word lists (continuations joined, heredoc bodies and comments
    left out, split at ; && || |). Lines shlex cannot split are left out (bash -n judges them)."""
    out: List[List[str]] = []
    lines = script.replace("\\\n", " ").splitlines()
    heredoc: Optional[str] = None
    for line in lines:
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            heredoc = m.group(1)
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            words = list(lex)
        except ValueError:
            continue
        current: List[str] = []
        for w in words:
            if w and set(w) <= set(";&|()<>"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(w)
        if current:
            out.append(current)
    return out


def spmd_args(words: Sequence[str]) -> Optional[List[str]]:
    """The spmd_dp arguments of a command (`... -m spmd_dp ARGS`, `bash scripts/run_local.sh ARGS`,
    `sbatch ... scripts/slurm.sbatch ARGS`), or None if it does not run spmd_dp."""
    for i, w in enumerate(words):
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "spmd_dp":
            return list(words[i + 2:])
        if Path(w).name in LAUNCH_SCRIPTS and "/" in w:
            return list(words[i + 1:])
    return None


# -- static checks ---------------------------------------------------------------------------------------
def schema_keys() -> Tuple[set, set]:
    """(every key path of the schema, the paths of mapping-typed keys that take new entries)."""
    import dataclasses
    import typing

    from spmd_dp.config.schema import RunConfig

    keys, maps = set(), set()

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            keys.add(path)
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                walk(t, path + ".")
            elif typing.get_origin(t) in (dict, typing.Dict):
                maps.add(path)

    walk(RunConfig, "")
    return keys, maps


def check_override(arg: str, keys: set, maps: set) -> Optional[str]:
    """Why an override names no key of the schema (or a preset that does not exist), or None."""
    if arg.startswith("-") or "=" not in arg or "$" in arg:
        return None
    key = arg.split("=", 1)[0].lstrip("+~")
    if key in PRESET_GROUPS:
        preset = REPO / "conf" / key / f"{arg.split('=', 1)[1]}.yaml"
        return None if preset.is_file() else f"no preset {preset.relative_to(REPO)}"
    if key in keys or any(key.startswith(m + ".") for m in maps):
        return None
    return f"'{key}' is not a key of spmd_dp/config/schema.py"


def make_targets() -> set:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


def static_checks(blocks: List[Block], run_slow: bool, report: Report) -> None:
    keys, maps = schema_keys()
    targets = make_targets()
    to_compose: List[Tuple[Block, List[str]]] = []
    for b in blocks:
        if b.lang not in ("bash", "sh", "shell"):
            continue
        problems = []
        syntax = subprocess.run(["bash", "-n"], input=b.text, capture_output=True, text=True)
        if syntax.returncode != 0:
            problems.append(f"bash -n: {syntax.stderr.strip()}")
        if b.kind not in KINDS:
            problems.append(f"unknown marker 'check: {b.kind}'; use one of {', '.join(KINDS[1:])}")
        runs_here = b.kind in ("run", "error") or (b.kind == "slow" and run_slow)
        for words in commands(b.text):
            for w in words:
                m = re.match(r"^(?:\./)?(scripts/[\w./-]+)$", w)
                if m and not (REPO / m.group(1)).exists():
                    problems.append(f"{m.group(1)} does not exist")
            if words and words[0] == "make":
                problems += [f"make {t}: no such target in the Makefile" for t in words[1:]
                             if "=" not in t and not t.startswith("-") and t not in targets]
            args = spmd_args(words)
            if args is None:
                continue
            bad = [] if b.kind == "error" else [why for a in args if (why := check_override(a, keys, maps))]
            problems += [f"{' '.join(words)[:80]}...: {why}" for why in bad]
            if not bad and not runs_here and not any(a in ("-h", "--help") or "$" in a for a in args):
                to_compose.append((b, args))  # composed and validated as a run would
        if problems:
            report.fail(f"{b.where}: static", "\n".join(problems))
    compose(to_compose, report)


def compose(items: List[Tuple[Block, List[str]]], report: Report) -> None:
    """`python -m spmd_dp --cfg job ARGS` for each command that is not run, in one process (the real CLI)."""
    if not items:
        return
    code = ("import contextlib, io, json, sys\n"
            "from spmd_dp.cli import _main\n"
            "out = []\n"
            "for args in json.loads(sys.stdin.read()):\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):\n"
            "        rc, msg = _main(['--cfg', 'job', *args])\n"
            "    out.append([rc, msg])\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps([a for _, a in items]), cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        report.fail("compose: the config check itself failed", proc.stderr[-2000:])
        return
    for (b, args), (rc, msg) in zip(items, json.loads(proc.stdout.splitlines()[-1])):
        if rc != 0:
            report.fail(f"{b.where}: {b.kind} command does not compose: spmd_dp {' '.join(args)}", msg)


# -- running -----------------------------------------------------------------------------------------------
def clean_env(workdir: Optional[Path] = None) -> Dict[str, str]:
    env = {k: v for k, v in launcher_free_env().items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = sys.prefix
    env["PYTHONPATH"] = str(workdir or REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    return env


def fresh_copy(dest: Path) -> Path:
    """The repository's tracked and untracked (not ignored) files, as a new clone's working tree would be."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__"))
        files = []
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    (dest / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return dest


def run_page(blocks: List[Block], run_slow: bool, timeout: float, keep: bool, report: Report) -> None:
    runnable = [b for b in blocks if b.kind in ("run", "error") or (b.kind == "slow" and run_slow)]
    for b in blocks:
        if b.kind in ("gpu", "cluster", "network") or (b.kind == "slow" and not run_slow):
            report.skip(f"{b.where}: {b.kind}" + (f" ({b.reason})" if b.reason else ""))
    if not runnable:
        return
    tmp = Path(tempfile.mkdtemp(prefix="spmd_dp-docs-"))
    try:
        work = fresh_copy(tmp / "repo")
        env = clean_env(work)
        last_bash: Optional[Block] = None
        for b in blocks:
            if b in runnable:
                last_bash = b
                t0 = time.monotonic()
                try:
                    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.text], cwd=work, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          timeout=max(timeout, 1800) if b.kind == "slow" else timeout)
                    b.output, rc = proc.stdout, proc.returncode
                except subprocess.TimeoutExpired as e:
                    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                    b.output, rc = out, f"timeout after {e.timeout:.0f}s"
                took = time.monotonic() - t0
                if rc == 0:
                    report.ok(f"{b.where}: ran in {took:.1f}s")
                else:
                    tail = "\n".join(b.output.splitlines()[-30:])
                    report.fail(f"{b.where}: exit {rc} after {took:.1f}s", f"$ {b.text.strip()}\n{tail}")
            elif b.kind == "expect":
                if last_bash is None or last_bash.output is None:
                    report.fail(f"{b.where}: expect: no bash block ran before it")
                    continue
                missing = [ln for ln in b.text.splitlines() if ln.strip() and ln.strip() not in last_bash.output]
                if missing:
                    report.fail(f"{b.where}: expected output not printed by {last_bash.where}",
                                "missing:\n" + "\n".join(missing) + "\nprinted (last 20 lines):\n" +
                                "\n".join(last_bash.output.splitlines()[-20:]))
                else:
                    report.ok(f"{b.where}: expected output found")
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def default_pages() -> List[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("pages", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    p.add_argument("--static", action="store_true", help="static checks only: run nothing")
    p.add_argument("--slow", action="store_true", help="also run the blocks marked slow")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a runnable block may take [300]")
    p.add_argument("--keep", action="store_true", help="keep the temp folders the pages ran in")
    args = p.parse_args(argv)
    pages = args.pages or default_pages()
    total = Report()
    for page in pages:
        report = Report()
        blocks = parse_blocks(page)
        static_checks(blocks, args.slow and not args.static, report)
        if not args.static:
            run_page(blocks, args.slow, args.timeout, args.keep, report)
        n = sum(b.lang in ("bash", "sh", "shell") for b in blocks)
        print(f"{_rel(page)}: {n} bash blocks, {len(report.failures)} failures", flush=True)
        for line in report.lines:
            print(line, flush=True)
        total.failures += report.failures
    print(f"check_docs: {len(pages)} pages, {len(total.failures)} failures")
    return 1 if total.failures else 0


if __name__ == "__main__":
    sys.exit(main())
