"""Config: the seeds' keys and defaults, Hydra overrides, rejected values as one line, the CLI."""

import pytest

from spmd_dp.config import load_config
from spmd_dp.errors import UsageError
from spmd_dp.config.schema import SAMPLE_INPUT
from spmd_dp.inputs import locations
from spmd_dp.output.paths import OutputPaths
from spmd_dp.testing import spmd


def test_defaults_are_the_seeds():
    cfg = load_config([])
    eo = cfg.engine_options
    # seed 000's engine option table (data_parallel_size: null = WORLD_SIZE, see DESIGN.md)
    assert (eo.gpus_per_dp_rank, eo.dp_master_ip, eo.dp_master_port) == (1, "127.0.0.1", None)
    assert (eo.enable_data_parallel, eo.disable_progress_bars, eo.trust_remote_code) == (True, True, False)
    assert eo.data_parallel_size is None
    assert (cfg.batch_size, cfg.batch_timeout, cfg.inference_engine) == (32, 600.0, "vllm_dp")
    assert (cfg.generation_options.temperature, cfg.generation_options.max_tokens) == (0.7, 512)
    assert cfg.schedule == "dynamic" and cfg.primary_key == "id"
    assert cfg.input_data_path == str(SAMPLE_INPUT) and SAMPLE_INPUT.is_file()  # the bundled sample dataset
    assert cfg.data_dir is None  # relative inputs: from the working directory
    assert OutputPaths.of(cfg).final.name == "generate_responses.jsonl"


def test_overrides():
    cfg = load_config(["batch_size=64", "engine_options.gpus_per_dp_rank=2", "schedule=static",
                       "generation_options.temperature=0", "+engine_options.vllm_kwargs.enforce_eager=true",
                       "+generation_options.extra.include_stop_str_in_output=true", "engine_options.echo_fail_ranks=[1]",
                       "input_data_path=/abs/in.jsonl"])
    assert (cfg.batch_size, cfg.engine_options.gpus_per_dp_rank, cfg.schedule) == (64, 2, "static")
    assert cfg.engine_options.vllm_kwargs == {"enforce_eager": True}
    assert cfg.generation_options.extra == {"include_stop_str_in_output": True}
    assert cfg.engine_options.echo_fail_ranks == [1]
    assert locations(cfg.data_dir, cfg.input_data_path) == ["/abs/in.jsonl"]


@pytest.mark.parametrize("override,expected", [
    ("foo=1", "unknown key 'foo'; every key: python -m spmd_dp --cfg job"),
    ("batch_sise=8", "unknown key 'batch_sise'; did you mean batch_size? every key: python -m spmd_dp --cfg job"),
    ("+foo=1", "unknown key 'foo'"),
    ("engine_options.gpu=1", "unknown key 'engine_options.gpu'; every key: python -m spmd_dp --cfg job"),
    ("engine_options.max_num_seq=8", "did you mean engine_options.max_num_seqs?"),
    ("batch_size=abc", "batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    ("batch_size=0", "batch_size=0 is not allowed; use an integer >= 1"),
    ("batch_timeout=-1", "batch_timeout=-1.0 is not allowed; use seconds > 0"),
    ("engine_options.gpus_per_dp_rank=0", "engine_options.gpus_per_dp_rank=0 is not allowed"),
    ("engine_options.data_parallel_size=0", "engine_options.data_parallel_size=0 is not allowed"),
    ("inference_engine=tgi", "inference_engine='tgi' is not allowed; use one of vllm_dp, echo"),
    ("schedule=fifo", "schedule='fifo' is not allowed; use one of dynamic, static"),
    ("generation_options.top_p=0", "generation_options.top_p=0.0 is not allowed"),
    ("engine_options.gpu_memory_utilization=1.5", "gpu_memory_utilization=1.5 is not allowed"),
    ("engine_options.vllm_kwargs.enforce_eager=true", "add it with a plus, +engine_options.vllm_kwargs.enforce_eager="),
    ("batch_size", "write overrides as key=value"),
    ("output_mode=parallel", "output_mode='parallel' is not allowed; use one of single, sharded"),
    ("merge=true", "merge=True is not allowed; merge=true joins the shards of output_mode=sharded into one file"),
])
def test_rejected_values_are_one_line(override, expected):
    with pytest.raises(UsageError) as e:
        load_config([override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    p = spmd(["batch_size=0"], cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["spmd_dp: config error: batch_size=0 is not allowed; "
                                              "use an integer >= 1 (the seed's default is 32)"]


def test_cli_prints_resolved_config(tmp_path):
    p = spmd(["--cfg", "job", "batch_size=7"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "batch_size: 7\n" in p.stdout and "gpus_per_dp_rank: 1" in p.stdout


def test_data_parallel_size_must_equal_world_size(tmp_path, records_file):
    from spmd_dp.testing import echo_args
    p = spmd(echo_args(tmp_path, records_file, "engine_options.data_parallel_size=3"), cwd=tmp_path)
    assert p.returncode == 2
    assert "engine_options.data_parallel_size=3 but WORLD_SIZE=1" in p.stderr
