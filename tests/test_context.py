"""What a prompt too long for the context becomes (spmd_dp/engines/context.py, `fit_context`): run, refused as vLLM
would, skipped, truncated on either side with room for the output asked, or run with max_tokens clamped."""

from spmd_dp.engines.context import fit_context


def test_fit_context():
    assert fit_context(10, 5, None, "fail", False).action == "run"
    assert fit_context(64, 5, 64, "fail", False).action == "refuse"  # no room for one token
    assert fit_context(60, 16, 64, "fail", False).action == "run"  # vLLM stops at the context end
    assert fit_context(70, 16, 64, "skip", False).action == "skip"
    assert fit_context(70, 16, 64, "truncate_left", False) == fit_context(60, 16, 64, "truncate_right", False)
    assert fit_context(70, 16, 64, "truncate_left", False).keep == 48
    assert fit_context(60, 16, 64, "fail", True).max_tokens == 4  # clamped
    assert fit_context(60, 16, 64, "truncate_right", True).max_tokens == 4  # clamped, not truncated
    assert fit_context(64, 0, 64, "fail", False, generate=False).action == "run"  # pooling: the whole context
    assert fit_context(65, 0, 64, "truncate_right", False, generate=False).keep == 64


def test_why_a_prompt_is_refused_names_the_fix():
    fit = fit_context(64, 5, 64, "fail", False)
    assert fit.reason == ("the prompt (64 tokens) is longer than max_model_len=64 allows (no room for an output "
                          "token); on_long_prompt=fail: set on_long_prompt=truncate_left, truncate_right or skip")
    assert fit_context(64, 5, 64, "fail", False, unit="words").reason.startswith(  # the echo engine's unit
        "the prompt (64 words) is longer than max_model_len=64 allows (no room for an output word)")
    assert fit_context(70, 16, 64, "skip", False).reason.endswith("; on_long_prompt=skip")
    no_room = fit_context(70, 64, 64, "truncate_left", False)  # the output asked takes the whole context
    assert no_room.action == "refuse" and "max_tokens=64 leaves no prompt token in max_model_len=64" in no_room.reason
    assert fit_context(63, 16, 64, "fail", True).max_tokens == 1  # one token of room: clamped to it
    assert fit_context(10, 16, 64, "fail", True).max_tokens is None  # it fits: unchanged
