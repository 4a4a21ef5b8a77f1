"""Preflight (`preflight=true` on the run's own command), end to end: under torchrun on the echo engine and on vLLM
CPU, the records that do not fit the context counted exactly (files of known lengths), nothing written but
${name}.preflight.json, a bad config or input still exit 2; the token counting in one process against the model's
own tokenizer (the bound that spares tokenizing a record never lets one that does not fit through)."""

import json
import math
import random

import numpy as np
import pytest

from spmd_dp.config import load_config
from spmd_dp.inputs import RecordSpec, scan_input
from spmd_dp.preflight.tokens import Tokens, count_share
from spmd_dp.prompting.options import sampling_kwargs
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.testing import echo_args, spmd, write_jsonl
from tests.helpers import one_line
from tests.vllm_jobs import PREFLIGHT, PREFLIGHT_SCALE, tokenizer_records

LIMIT, MAX_TOKENS = 40, 8


def known_lengths(n=300):
    """Records of 5..44 words; a few with their own max_tokens or on_long_prompt."""
    records = []
    for i in range(n):
        r = {"id": f"r{i:04d}", "prompt": " ".join(f"w{j}" for j in range(5 + (i * 7) % 40))}
        if i % 50 == 3:
            r["generation_options"] = {"max_tokens": 2}
        if i % 50 == 4:
            r["on_long_prompt"] = "skip"
        records.append(r)
    return records


def expected(records, limit=LIMIT, max_tokens=MAX_TOKENS):
    """What the run does with each record that does not fit (the echo engine: a word is a token)."""
    fate = {}
    for pos, r in enumerate(records):
        n = len(r["prompt"].split())
        m = r.get("generation_options", {}).get("max_tokens", max_tokens)
        if n + m <= limit:
            continue
        if n >= limit:  # no room for one output token
            fate[pos] = "skipped" if r.get("on_long_prompt") == "skip" else "refused"
        else:
            fate[pos] = "cut"
    return fate


@pytest.mark.slow
def test_echo_preflight_counts_exactly_what_does_not_fit_and_writes_only_its_file(tmp_path):
    records = known_lengths()
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    args = echo_args(tmp_path, inp, "batch_size=16", f"engine_options.max_model_len={LIMIT}",
                     f"generation_options.max_tokens={MAX_TOKENS}", "engine_options.echo_delay_s=0.002",
                     "preflight=true", "preflight.gpu_hour_price=3.5", name="pf")
    p = spmd(args, nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(x.name for x in out.iterdir()) == ["pf.preflight.json"]  # no journal, config, status, output
    r = json.loads((out / "pf.preflight.json").read_text())
    fate = expected(records)
    ctx = r["context"]
    assert ctx["not_fitting"] == len(fate) and ctx["max_model_len"] == LIMIT
    counts = {a: list(fate.values()).count(a) for a in set(fate.values())}
    assert ctx["actions"] == counts and counts["refused"] and counts["skipped"] and counts["cut"]
    assert [(f["position"], f["key"], f["action"]) for f in ctx["first"]] == \
        [(pos, records[pos]["id"], fate[pos]) for pos in sorted(fate)[:10]]
    lengths = np.array([len(x["prompt"].split()) for x in records])
    tok = r["prompt_tokens"]
    assert tok["counted"] == "every record" and tok["records"] == len(records)
    assert (tok["p50"], tok["p99"], tok["max"]) == (int(np.percentile(lengths, 50)), int(np.percentile(lengths, 99)),
                                                    44)
    assert r["input"]["records"] == 300 and r["options"]["own generation_options"] == 6
    cal = r["calibration"]["ranks"]
    assert [c["rank"] for c in cal] == [0, 1] and all(c["records"] > 0 and c["seconds"] > 0 for c in cal)
    proj = r["projection"]
    assert proj["records_to_run"] == 300 - counts["refused"] - counts["skipped"]
    assert proj["generation_s"] > 0 and proj["cost"] is not None and proj["ranks"] == 2
    assert 0 < proj["budget_used"] <= 1  # the sample's output over its max_tokens (as the context leaves them)
    assert [row["ranks"] for row in proj["by_world_size"]] == [1, 2, 4, 8]
    one, two = proj["by_world_size"][0], proj["by_world_size"][1]
    assert one["generation_s"] > 1.5 * (two["generation_s"] - proj["excess_s"])  # more ranks, less time
    # the summary, printed once (rank 0)
    assert p.stdout.count("spmd_dp preflight of pf: 2 ranks") == 1
    assert f"{len(fate)} records do not fit max_model_len 40" in p.stdout and "the run stops at the first" in p.stdout


@pytest.mark.slow
def test_a_token_sample_states_its_size_and_the_count_of_what_does_not_fit_stays_exact(tmp_path):
    records = known_lengths()
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp, f"engine_options.max_model_len={LIMIT}", f"generation_options.max_tokens={MAX_TOKENS}",
                       "preflight=true", "preflight.token_sample=50", "preflight.sample_records=5", name="pf"))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "pf.preflight.json").read_text())
    assert r["prompt_tokens"]["counted"] == "a uniform sample: every 6th record" and r["prompt_tokens"]["records"] == 50
    assert r["context"]["not_fitting"] == len(expected(records))
    assert r["calibration"]["ranks"][0]["records"] == 5 - sum(  # sample_records, drawn across the input
        1 for pos in (30, 90, 150, 210, 270) if len(records[pos]["prompt"].split()) >= LIMIT)


@pytest.mark.parametrize("case", ["bad config", "bad input"])
def test_preflight_of_a_bad_config_or_input_is_exit_2_and_writes_nothing(tmp_path, case):
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", known_lengths(20))
    extra = ["batch_size=0"] if case == "bad config" else []
    if case == "bad input":
        with open(inp, "a") as f:
            f.write('{"id": "x", "prompt": \n')
    p = spmd(echo_args(tmp_path, inp, "preflight=true", *extra), nproc=2 if case == "bad input" else None)
    assert (p.returncode == 2) if case == "bad config" else (p.returncode == 1 and p.stderr.count("exitcode  : 2") == 2)
    line = one_line(p)
    assert ("config error: batch_size=0" in line) if case == "bad config" else ("in.jsonl:21: malformed JSON" in line)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- the model's tokenizer, in one process ------------------------------------------------------------------------
def true_tokens(tok, record):
    if "messages" in record:
        text = tok.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])
    if isinstance(record["prompt"], list):
        return len(record["prompt"])
    return len(tok(record["prompt"])["input_ids"])


def test_the_models_tokenizer_counts_and_the_bound_never_misses_a_record_that_does_not_fit(tmp_path):
    from transformers import AutoTokenizer

    from spmd_dp.models.embedded import resolve_model

    records = tokenizer_records()
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    cfg = load_config(["engine_options.max_model_len=64", "generation_options.max_tokens=16", "on_long_prompt=skip"])
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model_name))
    truth = [true_tokens(tok, r) for r in records]
    prompts = PromptBuilder(cfg)
    index, _ = scan_input(inp, RecordSpec("id", prompts.check), 32)
    tokens = Tokens(cfg)
    assert tokens.limit == 64 and "tokenizer of" in tokens.describe
    not_fitting = sum(1 for n in truth if n + 16 > 64)
    assert 10 < not_fitting < 100  # the file crosses the limit
    every_record = count_share(index, prompts, sampling_kwargs(cfg, 0), (0, len(records)), tokens, every=1)
    assert sorted(every_record.lengths.tolist()) == sorted(truth)  # the model's tokens, templates and chat applied
    assert every_record.not_fitting == not_fitting
    assert every_record.actions == {"skipped": sum(n >= 64 for n in truth), "cut": sum(48 < n < 64 for n in truth)}
    sampled = count_share(index, prompts, sampling_kwargs(cfg, 0), (0, len(records)), tokens, every=7)
    assert sampled.not_fitting == not_fitting and sampled.actions == every_record.actions  # exact all the same
    assert sampled.sampled == math.ceil(len(records) / 7) and sampled.tokenized < len(records)
    for r, n in zip(records, truth):  # the bound holds for every record
        if "messages" not in r and not isinstance(r["prompt"], list):
            assert n <= tokens.bound(tokens.rendered(r["prompt"]))
    # without max_model_len: the model's own context (config.json)
    assert Tokens(load_config([])).limit == 2048


@pytest.mark.vllm("one_rank_b")
@pytest.mark.timeout(3600)  # it may wait for the shared runs
def test_vllm_preflight_counts_what_the_engine_then_skips(vllm_runs):
    """preflight=true on vLLM CPU (node pf of the shared job one_rank_b, tests/vllm_jobs.py), then the same job
    without it (node pfrun): the records preflight says on_long_prompt=skip skips are the ones the engine skipped
    (the errors file), and the projection is within reach of the run."""
    from transformers import AutoTokenizer

    from spmd_dp.models.embedded import resolve_model

    run = vllm_runs["one_rank_b"]
    limit, out = PREFLIGHT["engine_options"]["max_model_len"], PREFLIGHT["generation_options"]["max_tokens"]
    assert PREFLIGHT["on_long_prompt"] == "skip"
    assert run.finished("pf"), run.tail()
    assert sorted(x.name for x in run.out.glob("pf.*")) == ["pf.preflight.json"]  # nothing else of node pf
    r = json.loads((run.out / "pf.preflight.json").read_text())
    records = tokenizer_records(PREFLIGHT_SCALE)
    tok = AutoTokenizer.from_pretrained(resolve_model("spmd-dp/tiny-llama"))
    truth = [true_tokens(tok, x) for x in records]
    skipped = {records[i]["id"] for i, n in enumerate(truth) if n >= limit}
    assert 10 < len(skipped) < 100  # the file crosses the limit
    assert r["context"]["actions"]["skipped"] == len(skipped) and r["context"]["not_fitting"] == \
        sum(1 for n in truth if n + out > limit)
    assert r["calibration"]["ranks"][0]["records"] > 0 and r["projection"]["generation_s"] > 0
    errors = run.rows("pfrun", "errors.jsonl")
    assert {e["key"] for e in errors} == skipped  # what vLLM's own renderer found too long


# -- the projection's estimator, on a simulated engine (no timing: a model of one) ---------------------------------
def simulated_sample(lengths, slots, step_s=0.01):
    """An engine that runs `slots` requests at once, first come first served, one token each a step: the finishes
    of a sample as calibrate() notes them ([add order, seconds, output, prompt, budget])."""
    waiting, running, t, out = list(enumerate(lengths)), {}, 0.0, []
    while waiting or running:
        while waiting and len(running) < slots:
            i, n = waiting.pop(0)
            running[i] = n
        t += step_s
        for i in list(running):
            running[i] -= 1
            if running[i] == 0:
                del running[i]
                out.append([i, round(t, 6), lengths[i], 64, lengths[i]])
    return out


def test_the_full_engine_speed_is_found_from_a_skewed_sample_whose_drain_is_long():
    from spmd_dp.preflight.project import project, rank_speed

    rng = random.Random(3)
    lengths = [int(min(256, max(4, rng.lognormvariate(math.log(32), 1.0)))) for _ in range(64)]
    fin = simulated_sample(lengths, slots=32)
    speed = rank_speed({"finishes": fin, "concurrency": 32})
    full = 32 / 0.01  # tokens a second while all 32 slots run
    naive = sum(lengths) / max(f[1] for f in fin)
    assert naive < 0.8 * full  # the sample's average is far below: its drain is long
    assert abs(speed["rate"] / full - 1) < 0.08, (speed, full)
    uniform = rank_speed({"finishes": simulated_sample([50] * 64, slots=32), "concurrency": 32})
    assert abs(uniform["rate"] / full - 1) < 1e-6 and uniform["excess_s"] < 1e-6
    # the whole run: 384 records of the same distribution through the same engine, against the projection
    many = [int(min(256, max(4, rng.lognormvariate(math.log(32), 1.0)))) for _ in range(384)]
    run_s = max(f[1] for f in simulated_sample(many, slots=32))
    proj = project([{"finishes": fin, "concurrency": 32, "budget": sum(lengths)}], 384, 1, 1, 0.0, 0.0, None,
                   budget=sum(many))
    assert proj["output_tokens"] == sum(many)
    assert abs(proj["generation_s"] / run_s - 1) < 0.15, (proj["generation_s"], run_s)
    one = rank_speed({"finishes": simulated_sample([50] * 64, slots=1), "concurrency": 1})  # one at a time (echo)
    assert abs(one["rate"] - 1 / 0.01) < 1e-6
