"""A record's own request options (spmd_dp/prompting/options.py), without an engine: the record's options over the
config's, a sampling seed of the record's own (the same run and key, the same seed, on any rank and any rerun),
the task and adapter read only when the run has several, per-rank sampling overrides. (Checked by the scan, end to
end: tests/test_requests.py.)"""

from spmd_dp.config import load_config
from spmd_dp.prompting.options import RequestOptions, record_seed, sampling_kwargs


def opts(*overrides):
    return RequestOptions(load_config(list(overrides)))


def test_the_records_options_over_the_configs():
    o = opts("on_long_prompt=skip", "max_retries=2", "+pooling_options.dimensions=4")
    base = {"temperature": 0.7, "max_tokens": 16, "structured_outputs": None}
    req = o.request("0:3", {"id": "k", "generation_options": {"max_tokens": 5, "stop": ["\n"]},
                            "clamp_max_tokens": True, "pooling_options": {"use_activation": False}}, "the prompt", base)
    assert req.sampling == {"temperature": 0.7, "max_tokens": 5, "stop": ["\n"]}  # no empty constraint passed on
    assert (req.request_id, req.prompt, req.key, req.task, req.lora) == ("0:3", "the prompt", "k", "generate", None)
    assert (req.on_long_prompt, req.clamp_max_tokens, req.max_retries) == ("skip", True, 2)
    assert req.pooling == {"dimensions": 4, "use_activation": False}
    assert base == {"temperature": 0.7, "max_tokens": 16, "structured_outputs": None}  # the config's is not changed


def test_a_seed_is_the_records_own():
    o = opts()
    a = o.request("0:0", {"id": "a"}, "p", {"seed": 7}).sampling["seed"]
    assert a == record_seed(7, "a") == o.request("9:9", {"id": "a"}, "q", {"seed": 7}).sampling["seed"]
    assert a != o.request("0:1", {"id": "b"}, "p", {"seed": 7}).sampling["seed"]  # another record, another seed
    assert a != record_seed(8, "a") and 0 <= a < 2 ** 31
    assert "seed" not in o.request("0:0", {"id": "a"}, "p", {"seed": None}).sampling
    assert o.request("0:0", {"id": "a", "generation_options": {"seed": 3}}, "p", {"seed": 7}).sampling["seed"] == \
        record_seed(3, "a")  # the record's own seed, made its own too


def test_task_is_read_only_when_the_run_has_several_and_an_adapter_always_checked():
    single = opts()
    r = single.request("0:0", {"id": 1, "task": "embed"}, "p", {})
    assert r.task == "generate" and r.lora is None  # 'task': the record's own data, not an option
    assert "'lora_adapter' is 'x' but no adapter is configured" in single.check({"id": 1, "lora_adapter": "x"})
    several = opts("task=[generate,embed]", "+engine_options.lora_adapters.pirate=/a", "lora_adapter=pirate")
    r = several.request("0:0", {"id": 1, "task": "embed"}, "p", {"seed": 5})
    assert r.task == "embed" and r.lora == "pirate" and "seed" not in r.sampling  # no sampling seed for pooling
    assert several.request("0:0", {"id": 1, "lora_adapter": None}, "p", {}).lora is None  # the base model
    assert several.check({"id": 1, "task": "score"}).startswith("the request needs task=score")


def test_a_ranks_sampling_arguments():
    cfg = load_config(["generation_options.temperature=0.5", "generation_options.seed=null",
                       "+generation_options.ignore_eos=true", "+generation_options_per_rank.1.max_tokens=7"])
    zero, one = sampling_kwargs(cfg, 0), sampling_kwargs(cfg, 1)
    assert zero["temperature"] == 0.5 and zero["ignore_eos"] is True and "seed" not in zero  # null: left out
    assert one == {**zero, "max_tokens": 7} and zero["max_tokens"] != 7
