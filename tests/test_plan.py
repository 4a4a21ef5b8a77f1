"""The rank plan and the output paths: derived once from plain dicts, no process group, no torch.
Also the `~` regression: every file of a run lands under the expanded output_dir."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spmd_dp.config import load_config
from spmd_dp.errors import UsageError
from spmd_dp.output.paths import OutputPaths
from spmd_dp.plan import RankPlan
from spmd_dp.testing import REPO, echo_args, make_records, read_jsonl, spmd, write_jsonl

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
            "MASTER_PORT": "29400"}
NODE4 = [(str(i), f"GPU-{i}") for i in range(4)]


def test_plan_of_a_gpu_rank_from_torchrun_env():
    cfg = load_config(["engine_options.gpus_per_dp_rank=2"])
    plan = RankPlan.build(cfg, TORCHRUN, physical_gpus=NODE4)
    assert (plan.rank, plan.world_size, plan.is_rank0) == (3, 4, False)
    assert plan.device.kind == "cuda" and plan.device.ids == ("2", "3") and plan.device.tensor_parallel_size == 2
    assert plan.vllm_port == 29400 + 1000 + 100  # local rank 1's range
    assert plan.describe().startswith("rank 3/4 (local 1/2, torchrun) on GPUs 2,3 (tensor_parallel_size=2)")
    with pytest.raises(Exception):
        plan.env = None  # frozen


def test_single_process_is_rank0_and_echo_takes_no_device():
    plan = RankPlan.build(load_config(["inference_engine=echo"]), {})
    assert plan.is_rank0 and plan.world_size == 1 and plan.device.ids == ()


@pytest.mark.parametrize("override,match", [
    ("engine_options.data_parallel_size=2", "data_parallel_size=2 but WORLD_SIZE=4"),
    ("+generation_options_per_rank.7.max_tokens=3", "names ranks 7 but WORLD_SIZE=4"),
    ("engine_options.enable_data_parallel=false", "enable_data_parallel=false runs one engine but WORLD_SIZE=4"),
])
def test_plan_checks_the_config_against_the_world(override, match):
    with pytest.raises(UsageError, match=match):
        RankPlan.build(load_config([override, "inference_engine=echo"]), TORCHRUN)


def test_too_many_gpus_per_rank_names_the_fix():
    with pytest.raises(UsageError, match="need 6 GPUs but 4 are visible"):
        RankPlan.build(load_config(["engine_options.gpus_per_dp_rank=3"]), TORCHRUN, physical_gpus=NODE4)


def test_output_paths_resolve_home_and_relative_dirs_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    p = OutputPaths.of(load_config(["output_dir='~/runs'", "name=x", "output_format=parquet"]))
    assert p.dir == tmp_path / "home" / "runs"
    assert [q.name for q in (p.final, p.metrics, p.config, p.journal, p.parts, p.errors)] == \
        ["x.parquet", "x.metrics.json", "x.config.yaml", "x.journal.jsonl", "x.parts", "x.errors.jsonl"]
    assert all(q.parent == p.dir for q in (p.final, p.metrics, p.config, p.journal, p.parts, p.errors))
    assert OutputPaths.of(load_config(["output_dir=out"])).dir == tmp_path / "out"


def test_the_torch_free_modules_import_neither_torch_nor_vllm():
    code = ("import sys; import spmd_dp.plan, spmd_dp.generation, spmd_dp.rank0, spmd_dp.control.outbox, spmd_dp.control.claims; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vllm'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _input_work_home(tmp_path, n):
    """An input of n records, an empty working directory and a home directory (HOME for the run)."""
    records = make_records(n)
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    return records, inp, work, home


def _run_in(cwd: Path, home: Path, args):
    return spmd(args, cwd=cwd, env={"HOME": str(home), "PYTHONPATH": str(REPO)}, timeout=120)


def test_tilde_output_dir_from_the_command_line(tmp_path):
    """Regression: the journal, parts and config went to a folder named '~' under the working directory."""
    records, inp, work, home = _input_work_home(tmp_path, 20)
    args = [a for a in echo_args(tmp_path, inp, "batch_size=4") if not a.startswith("output_dir=")]
    p = _run_in(work, home, [*args, "output_dir='~/somewhere'"])
    assert p.returncode == 0, p.stderr[-3000:]
    out = home / "somewhere"
    assert sorted(x.name for x in out.iterdir()) == ["out.config.yaml", "out.events.jsonl", "out.journal.jsonl",
                                                     "out.jsonl", "out.metrics.json", "out.status.json",
                                                     "out.timeline.png"]
    assert [r["id"] for r in read_jsonl(out / "out.jsonl")] == [r["id"] for r in records]
    assert list(work.iterdir()) == []  # nothing under the working directory, no folder named '~'
    again = _run_in(work, home, [*args, "output_dir='~/somewhere'"])  # the journal is found again: nothing to do
    assert again.returncode == 0 and "complete already" in again.stderr


def test_tilde_output_dir_from_a_workflow_file(tmp_path):
    records, inp, work, home = _input_work_home(tmp_path, 12)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({
        "name": "wf", "data_dir": str(inp.parent), "output_dir": "~/wf_out",
        "nodes": [{"id": "load", "type": "load", "params": {"input_data_path": inp.name}},
                  {"id": "a", "type": "text_prompt", "params": {"name": "a", "inference_engine": "echo"},
                   "dependencies": ["load"]},
                  {"id": "b", "type": "text_prompt", "params": {"name": "b", "inference_engine": "echo"},
                   "dependencies": ["a"]}]}))
    p = _run_in(work, home, [f"workflow={wf}", "generation_options.max_tokens=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    out = home / "wf_out"
    assert {x.name for x in out.iterdir()} >= {"a.jsonl", "a.journal.jsonl", "a.config.yaml", "b.jsonl",
                                               "b.journal.jsonl", "b.metrics.json"}
    rows = read_jsonl(out / "b.jsonl")  # node b read node a's output from the expanded folder
    assert [r["id"] for r in rows] == [r["id"] for r in records] and all("a" in r and "b" in r for r in rows)
    assert list(work.iterdir()) == []
