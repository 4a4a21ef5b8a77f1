"""One rule for relative paths in every file option (spmd_dp/config/paths.py, issue 25): from the option's own base
directory when given (data_dir, prompts_dir), else from the working directory; messages name the directory."""

import json

import pytest

from spmd_dp.config import load_config
from spmd_dp.errors import UsageError
from spmd_dp.inputs import locations
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.testing import make_records, read_jsonl, spmd, write_jsonl
from spmd_dp.workflow import read_workflow


def test_every_file_option_is_read_from_the_working_directory(tmp_path):
    records = make_records(9)
    write_jsonl(tmp_path / "my.jsonl", records)
    (tmp_path / "t.jinja").write_text("Q: {{ prompt }}")
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object"}))
    p = spmd(["input_data_path=my.jsonl", "prompt_template=t.jinja", "output_dir=out", "name=o",
              "+generation_options.structured_outputs.json=schema.json", "inference_engine=echo",
              "generation_options.max_tokens=3"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["o"] for r in read_jsonl(tmp_path / "out" / "o.jsonl")] == [f"Q: {r['prompt'].split()[0]} "
                                                                           f"{r['prompt'].split()[1]}" for r in records]
    assert f"prompts from template {tmp_path / 't.jinja'}" in p.stderr


def test_the_sample_job_runs_with_no_arguments_from_anywhere(tmp_path):
    p = spmd(["inference_engine=echo", "generation_options.max_tokens=2"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "outputs" / "generate_responses.jsonl")) == 96  # outputs/ of the working dir


def test_base_directories_when_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "t.jinja").write_text("{{ prompt }}")
    cfg = load_config(["data_dir=data", "input_data_path=in.jsonl", "prompts_dir=prompts", "prompt_template=t.jinja"])
    assert locations(cfg.data_dir, cfg.input_data_path) == [str(tmp_path / "data" / "in.jsonl")]
    assert PromptBuilder(cfg).template_path == tmp_path / "prompts" / "t.jinja"
    cfg = load_config(["input_data_path=in.jsonl", "prompt_template=prompts/t.jinja"])  # no base dirs: the cwd
    assert locations(cfg.data_dir, cfg.input_data_path) == [str(tmp_path / "in.jsonl")]
    assert PromptBuilder(cfg).template_path == tmp_path / "prompts" / "t.jinja"


def test_model_adapter_and_workflow_paths_are_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters" / "pirate").mkdir(parents=True)
    (tmp_path / "models" / "m").mkdir(parents=True)
    cfg = load_config(["model_name=models/m", "+engine_options.lora_adapters.pirate=adapters/pirate",
                       "+engine_options.lora_adapters.a=spmd-dp/tiny-llama-lora-a", "workflow=wf.json"])
    assert cfg.model_name == str(tmp_path / "models" / "m")  # an existing folder: local, as vLLM reads it
    assert cfg.engine_options.lora_adapters == {"pirate": str(tmp_path / "adapters" / "pirate"),
                                                "a": "spmd-dp/tiny-llama-lora-a"}
    assert cfg.workflow == str(tmp_path / "wf.json")
    assert load_config(["model_name=org/model"]).model_name == "org/model"  # no such folder: a hub id
    assert load_config(["model_name=./org/model"]).model_name == str(tmp_path / "org" / "model")  # written as a path


def test_messages_name_the_directory_looked_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    with pytest.raises(UsageError, match=rf"prompt_template='t.jinja': {tmp_path}/t.jinja does not exist \(relative to "
                                         rf"the working directory {tmp_path}\)"):
        PromptBuilder(load_config(["prompt_template=t.jinja"]))
    with pytest.raises(UsageError, match=rf"{tmp_path}/prompts/t.jinja does not exist \(relative to prompts_dir="
                                         rf"{tmp_path}/prompts\)"):
        PromptBuilder(load_config(["prompts_dir=prompts", "prompt_template=t.jinja"]))
    with pytest.raises(UsageError, match=rf"prompts_dir='nope': {tmp_path}/nope is not a folder"):
        PromptBuilder(load_config(["prompts_dir=nope"]))
    with pytest.raises(UsageError, match=rf"structured_outputs.json='s.json': {tmp_path}/s.json: No such file .*"
                                         rf"relative to the working directory {tmp_path}"):
        load_config(["+generation_options.structured_outputs.json=s.json"])
    with pytest.raises(UsageError, match=rf"{tmp_path}/wf.json: cannot read it .*read from the working directory"):
        read_workflow(tmp_path / "wf.json")


def test_a_missing_input_names_where_it_was_looked_for(tmp_path):
    p = spmd(["input_data_path=nope.jsonl", "inference_engine=echo"], cwd=tmp_path)
    assert p.returncode == 2
    assert f"input error: {tmp_path}/nope.jsonl does not exist; set data_dir= and input_data_path= (a relative path " \
           "is read from data_dir if set, else the working directory" in p.stderr, p.stderr[-2000:]


def test_the_default_input_is_the_bundled_sample_by_its_absolute_path(tmp_path, monkeypatch):
    from spmd_dp.config.schema import SAMPLE_INPUT

    monkeypatch.chdir(tmp_path)
    cfg = load_config([])
    assert cfg.data_dir is None and locations(cfg.data_dir, cfg.input_data_path) == [str(SAMPLE_INPUT)]
    assert SAMPLE_INPUT.is_file()
