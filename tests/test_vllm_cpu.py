"""Real vLLM on CPU with the embedded model: 2 ranks give the 1-rank output, record for record."""

import re

import pytest

from tests.conftest import make_records, read_jsonl, spmd, write_jsonl

pytestmark = pytest.mark.vllm


def vllm_args(tmp_path, inp, name, *extra):
    return [f"data_dir={inp.parent}", f"input_data_path={inp.name}", f"output_dir={tmp_path / 'out'}",
            f"name={name}", "generation_options.temperature=0", "generation_options.max_tokens=24",
            "batch_size=4", "engine_options.max_model_len=512", *extra]


def test_two_ranks_equal_one_rank_greedy(tmp_path):
    records = [{"id": r["id"], "prompt": f"Tell me about {r['prompt']}"} for r in make_records(30, words=5)]
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    one = spmd(vllm_args(tmp_path, inp, "one"), timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    two = spmd(vllm_args(tmp_path, inp, "two"), nproc=2, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = read_jsonl(tmp_path / "out" / "one.jsonl"), read_jsonl(tmp_path / "out" / "two.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in records] == [r["id"] for r in b]
    assert all(x["one"] for x in a), "every record got text"
    assert [x["one"] for x in a] == [x["two"] for x in b]
    # each rank ran its own engine on its own core
    assert re.search(r"\[rank 0/2 .*on CPU cores 0 \(tensor_parallel_size=1\)", two.stderr)
    assert re.search(r"\[rank 1/2 .*on CPU cores 1 \(tensor_parallel_size=1\)", two.stderr)
    assert "Worker rank 0 is ready" in two.stderr and "Worker rank 1 is ready" in two.stderr
