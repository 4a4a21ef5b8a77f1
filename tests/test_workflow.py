"""Seed 000's workflow files, presets, Parquet output, progress and metrics."""

import json

import pytest

from spmd_dp.config import load_config
from spmd_dp.errors import UsageError
from spmd_dp.workflow import workflow_configs
from spmd_dp.testing import REPO, echo_args, make_records, read_jsonl, spmd, write_jsonl

SEED_SINGLE = REPO / "examples" / "workflows" / "seed_single_node.json"
SEED_WORKFLOW = REPO / "examples" / "workflows" / "seed_data_parallel_workflow.json"
DATA = REPO / "examples" / "data"


def test_seed_files_map_onto_the_config():
    single = workflow_configs(SEED_SINGLE, [])
    assert len(single) == 1 and single[0].name == "task_name"
    eo = single[0].engine_options
    assert (eo.data_parallel_size, eo.gpus_per_dp_rank, eo.gpu_memory_utilization, eo.max_model_len) == (2, 2, 0.9, 4096)
    assert (single[0].batch_size, single[0].generation_options.max_tokens) == (32, 512)
    (wf,) = workflow_configs(SEED_WORKFLOW, ["model_name=spmd-dp/tiny-llama"])  # the command line wins
    assert (wf.name, wf.data_dir, wf.output_dir, wf.prompts_dir, wf.input_data_path, wf.primary_key) == (
        "generate_responses", "/data", "/output", "/prompts", "dataset.jsonl", "id")
    assert (wf.model_name, wf.engine_options.data_parallel_size, wf.engine_options.dtype, wf.batch_size) == (
        "spmd-dp/tiny-llama", 4, "bfloat16", 64)


def test_map_valued_keys_take_new_keys_from_a_node_and_the_command_line(tmp_path):
    """engine_options.vllm_kwargs and lora_adapters are maps: a node's params and `+key=` overrides add keys to
    them, as they do without a workflow; a key the schema lacks is still refused."""
    params = {"name": "x", "engine_options": {"vllm_kwargs": {"enforce_eager": False},
                                              "lora_adapters": {"a": "spmd-dp/tiny-llama-lora-a"}}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"nodes": [{"id": "gen", "type": "text_prompt", "params": params}]}))
    (cfg,) = workflow_configs(path, ["+engine_options.vllm_kwargs.seed=7"])
    assert cfg.engine_options.vllm_kwargs == {"enforce_eager": False, "seed": 7}
    assert cfg.engine_options.lora_adapters == {"a": "spmd-dp/tiny-llama-lora-a"}
    with pytest.raises(UsageError, match="unknown key 'engine_options.vllm_kwarg'"):
        workflow_configs(path, ["+engine_options.vllm_kwarg.seed=7"])
    params["engine_options"]["lora_adapter"] = {"a": "spmd-dp/tiny-llama-lora-a"}
    path.write_text(json.dumps({"nodes": [{"id": "gen", "type": "text_prompt", "params": params}]}))
    with pytest.raises(UsageError, match="Key 'lora_adapter' not in 'EngineOptions'"):
        workflow_configs(path, [])


@pytest.mark.parametrize("change,expected", [
    ({"type": "summarize"}, "has type 'summarize'; spmd_dp runs node types load, text_prompt"),
    ({"dependencies": ["nowhere"]}, "depends on 'nowhere', which is not a node"),
    ({"params": {"name": "x", "batch_sise": 3}}, "node 'gen': batch_sise: Key 'batch_sise' not in 'RunConfig'"),
    ({"params": {"name": "x", "inference_engine": "tgi"}}, "node 'gen': inference_engine='tgi' is not allowed"),
])
def test_bad_workflows_are_one_line(tmp_path, change, expected):
    wf = {"nodes": [{"id": "load", "type": "load", "params": {"input_data_path": "in.jsonl"}, "dependencies": []},
                    {"id": "gen", "type": "text_prompt", "params": {"name": "x"}, "dependencies": ["load"], **change}]}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    with pytest.raises(UsageError) as e:
        workflow_configs(path, [])
    assert expected in str(e.value) and "\n" not in str(e.value)
    p = spmd([f"workflow={path}"], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(f"spmd_dp: workflow error: {path}")


def test_cycle_and_not_json(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"nodes": [{"id": "a", "type": "text_prompt", "dependencies": ["b"]},
                                          {"id": "b", "type": "text_prompt", "dependencies": ["a"]}]}))
    with pytest.raises(UsageError, match="dependency cycle: a -> b -> a"):
        workflow_configs(path, [])
    path.write_text("{nodes: ")
    with pytest.raises(UsageError, match="not JSON"):
        workflow_configs(path, [])


def test_chained_nodes_through_torchrun(tmp_path):
    """draft -> review: the review node reads the draft node's output through its template."""
    out = tmp_path / "out"
    p = spmd([f"workflow={REPO / 'examples/workflows/draft_then_review.json'}", "inference_engine=echo",
              f"data_dir={DATA}", f"prompts_dir={REPO / 'examples/prompts'}", f"output_dir={out}"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "workflow node 2/2: review" in p.stderr and "engine kept" in p.stderr
    review = read_jsonl(out / "review.jsonl")
    source = read_jsonl(DATA / "dataset.jsonl")
    assert [r["id"] for r in review] == [r["id"] for r in source]
    for r, s in zip(review, source):
        assert r["draft"] == " ".join(s["prompt"].split()[:64])
        assert r["review"] == " ".join(f"Here is a request and a draft answer. Request: {s['prompt']} Draft: "
                                       f"{r['draft']} Point out one way to improve the draft.".split()[:32])


def test_presets_compose():
    cfg = load_config(["model=llama-3.1-70b-instruct", "hardware=8gpu_2x4"])
    assert cfg.model_name == "meta-llama/Llama-3.1-70B-Instruct" and cfg.chat
    assert (cfg.engine_options.data_parallel_size, cfg.engine_options.gpus_per_dp_rank) == (2, 4)
    cfg = load_config(["model=llama-2-13b-chat", "hardware=4gpu_2x2", "engine_options.gpus_per_dp_rank=1"])
    assert cfg.engine_options.gpus_per_dp_rank == 1  # the command line wins over presets
    assert load_config(["hardware=8gpu_4x2"]).engine_options.data_parallel_size == 4
    with pytest.raises(UsageError, match="Could not find 'hardware/16gpu'; available: 4gpu_2x2, 8gpu_2x4, 8gpu_4x2, cpu"):
        load_config(["hardware=16gpu"])


def test_parquet_output_round_trip(tmp_path):
    import pyarrow.parquet as pq

    records = make_records(70, words=5)
    records[3]["extra"] = {"nested": [1, 2]}
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp, "output_format=parquet", "batch_size=8", "return_metadata=true"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out" / "out.parquet").to_pylist()
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert rows[3]["extra"] == {"nested": [1, 2]} and rows[0]["extra"] is None
    assert rows[0]["out"] == " ".join(records[0]["prompt"].split()[:4]) and rows[0]["out_metadata"]["output_tokens"] == 4
    assert not (tmp_path / "out" / "out.jsonl").exists()


def test_progress_and_metrics(tmp_path):
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", make_records(90, words=6))
    p = spmd(echo_args(tmp_path, inp, "batch_size=10", "engine_options.echo_delay_s=0.002"), nproc=3)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "progress: 90/90 records (100.0%)" in p.stderr  # not a terminal: progress lines, not a bar
    summary = p.stderr[p.stderr.index("   rank   records"):]
    assert "total" in summary and "imbalance" in summary
    m = json.loads((tmp_path / "out" / "out.metrics.json").read_text())
    assert [r["rank"] for r in m["ranks"]] == [0, 1, 2]
    assert sum(r["records"] for r in m["ranks"]) == 90 == m["total"]["records"]
    assert all(r["busy_s"] > 0 and r["output_tokens_per_s"] > 0 for r in m["ranks"] if r["records"])
    t, busy = m["total"], [r["busy_s"] for r in m["ranks"] if r["busy_s"] > 0]
    assert t["output_tokens"] == 90 * 4 == sum(r["output_tokens"] for r in m["ranks"])  # 4 words echoed a record
    assert 0 < t["generation_s"] <= t["wall_s"]  # the generation span lies inside the run
    # rates of the unrounded times: equal to those of the rounded ones within their rounding (a ms of 0.1 s at least)
    assert t["output_tokens_per_s"] == pytest.approx(t["output_tokens"] / t["wall_s"], rel=0.01)
    assert t["generation_tokens_per_s"] == pytest.approx(t["output_tokens"] / t["generation_s"], rel=0.01)
    assert t["imbalance"] == round(max(busy) / (sum(busy) / len(busy)), 4) >= 1
    assert t["output_bytes"] == (tmp_path / "out" / "out.jsonl").stat().st_size
    assert t["merge_mb_per_s"] > 0 and t["rank0_peak_rss_mb"] > 0



def test_a_workflow_runs_on_the_config_the_command_line_names(tmp_path):
    """--config-name/--config-path: the keys the workflow leaves unset come from that config."""
    (tmp_path / "mine.yaml").write_text((REPO / "conf" / "config.yaml").read_text() + "schedule: static\n")
    (cfg,) = workflow_configs(SEED_SINGLE, [], "mine", str(tmp_path))
    assert (cfg.schedule, cfg.name, cfg.batch_size) == ("static", "task_name", 32)  # the file's keys still win
    p = spmd(["--config-path", str(tmp_path), "--config-name", "mine", f"workflow={SEED_SINGLE}", "--cfg", "job"])
    assert p.returncode == 0 and "schedule: static" in p.stdout and "name: task_name" in p.stdout, p.stderr
