"""The echo engine (spmd_dp/engines/echo.py), the deterministic dry run, called directly: its text is the prompt's
first max_tokens words (a chat's last user turn, token ids as words), long prompts as vLLM's (refused, skipped,
truncated, clamped), the pooling tasks' values, and its fault switches: a start that fails, requests that fail a
number of times, an engine that dies or hangs after some steps."""

import threading

import pytest

from spmd_dp.config import load_config
from spmd_dp.engines.base import FAILED, SKIPPED, Chat, EngineStartError, Pair, Request
from spmd_dp.engines.echo import EchoEngine


def engine(*overrides, rank=0, attempt=0, batch_size=4):
    return EchoEngine(load_config(list(overrides)).engine_options, batch_size, rank, attempt)


def req(rid, prompt, max_tokens=3, **kw):
    return Request(rid, prompt, {"max_tokens": max_tokens, **kw.pop("sampling", {})}, **kw)


def run(e, *requests):
    for r in requests:
        assert e.add(r) is None
    done = {}
    while len(done) < len(requests):
        done.update({c.request_id: c for c in e.step()})
    return [done[r.request_id] for r in requests]


def test_text_is_the_prompts_first_words():
    e = engine()
    text, chat, ids, n = run(e, req("a", "one  two three four"), req("b", Chat([
        {"role": "user", "content": "first turn"}, {"role": "assistant", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "last"}, {"type": "text", "text": "turn here"}]}])),
        req("c", [5, 6, 7, 8]), req("d", "x y", sampling={"n": 2}))
    assert (text.texts, text.prompt_tokens, text.output_tokens, text.finish_reason) == (["one two three"], 4, 3, "length")
    assert chat.texts == ["last turn here"]  # the last user turn, its text parts joined
    assert ids.texts == ["5 6 7"]  # token ids count as words
    assert n.texts == ["x y", "x y"] and n.output_tokens == 4 and n.finish_reason == "stop"
    assert text.token_ids == run(engine(), req("z", "one two three"))[0].token_ids  # ids are the words' own


def test_a_step_finishes_everything_unless_it_sleeps():
    fast = engine()
    for i in range(5):
        fast.add(req(str(i), "a b"))
    assert len(fast.step()) == 5 and fast.step() == []
    slow = engine("engine_options.echo_delay_s=0.001")
    for i in range(3):
        slow.add(req(str(i), "a b"))
    assert [len(slow.step()) for _ in range(4)] == [1, 1, 1, 0]  # one request a step, as it sleeps per word
    assert engine("engine_options.max_num_seqs=64").capacity == 64 and engine().capacity == 4  # else batch_size


def test_logprobs_one_per_word():
    (c,) = run(engine(), req("a", "p q r", sampling={"logprobs": 5}))
    (lp,) = c.logprobs
    assert lp.logprobs == [0.0] * 3 and lp.tokens == ["p", "q", "r"] and [len(t) for t in lp.top_ids] == [1] * 3
    assert [t[0] for t in lp.top_ids] == c.token_ids[0]


def test_long_prompts_as_vllm_takes_them():
    e = engine("engine_options.max_model_len=5")
    refused = e.add(req("a", "1 2 3 4 5"))  # no room for one word
    assert refused.error == ("the prompt (5 words) is longer than max_model_len=5 allows (no room for an output "
                             "word); on_long_prompt=fail: set on_long_prompt=truncate_left, truncate_right or skip")
    assert refused.error_kind != SKIPPED
    skipped = e.add(req("b", "1 2 3 4 5 6", on_long_prompt="skip"))
    assert skipped.error_kind == SKIPPED and "on_long_prompt=skip" in skipped.error and "(6 words)" in skipped.error
    left, right, clamped, cut = run(e, req("c", "1 2 3 4 5 6 7", 2, on_long_prompt="truncate_left"),
                                    req("d", "1 2 3 4 5 6 7", 2, on_long_prompt="truncate_right"),
                                    req("e", "1 2 3 4", 3, clamp_max_tokens=True), req("f", "1 2 3 4", 3))
    assert (left.texts, left.truncated_from, left.prompt_tokens) == (["5 6"], 7, 3)  # the last 3 words kept
    assert right.texts == ["1 2"] and right.truncated_from == 7
    assert clamped.texts == ["1"] and cut.texts == ["1"] and cut.finish_reason == "length"  # the context ends


def test_pooling_tasks():
    e = engine()
    emb, emb4, again, cls, score, reward = run(
        e, req("a", "some words", task="embed"), req("b", "some words", task="embed", pooling={"dimensions": 4}),
        req("c", "some words", task="embed"), req("d", "a bb ccccc dddddd", task="classify"),
        req("e", Pair("a b c", "b c d"), task="score"), req("f", "one two three", task="reward"))
    assert len(emb.value) == 8 and all(0 <= x <= 1 for x in emb.value) and emb.value == again.value
    assert emb4.value == emb.value[:4]
    assert cls.value == [0.5, 0.5]  # shares of short (<= 4) and long words
    assert score.value == 2 / 4 and reward.value == 3.0 and emb.texts == [] and emb.prompt_tokens == 2


def test_a_rank_listed_fails_to_start():
    with pytest.raises(EngineStartError, match="rank 1 is listed in engine_options.echo_fail_ranks"):
        engine("engine_options.echo_fail_ranks=[1]", rank=1)
    engine("engine_options.echo_fail_ranks=[1]", rank=0)


def test_requests_fail_a_number_of_times_then_succeed():
    e = engine("engine_options.echo_fail_keys=[k7]", "engine_options.echo_fail_times=2")
    tries = [run(e, req("a", "x y", key="k7"))[0] for _ in range(3)]
    assert [c.error_kind for c in tries[:2]] == [FAILED, FAILED] and "injected failure 2 of 2" in tries[1].error
    assert tries[2].error is None and tries[2].texts == ["x y"]
    assert run(e, req("b", "x", key="other"))[0].error is None


def test_an_engine_that_dies_or_hangs_after_some_steps():
    dies = engine("engine_options.echo_fault_ranks=[0]", "engine_options.echo_fault_after_steps=2")
    for i in range(3):
        dies.add(req(str(i), "x"))
        if i < 2:
            assert len(dies.step()) == 1
    with pytest.raises(RuntimeError, match="echo engine died"):
        dies.step()
    restarted = engine("engine_options.echo_fault_ranks=[0]", "engine_options.echo_fault_after_steps=0", attempt=1)
    assert restarted.fault is None  # echo_fault_times=1: the first restart runs clean
    hangs = engine("engine_options.echo_fault_ranks=[0]", "engine_options.echo_fault=hang",
                   "engine_options.echo_fault_after_steps=0")
    hangs.add(req("a", "x"))
    stepped = []
    t = threading.Thread(target=lambda: stepped.append(hangs.step()))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # no answer
    hangs.close()  # what the supervisor does when it gives up on it
    t.join(5)
    assert stepped == [[]] and len(hangs.queue) == 0
