"""The shape of an output row (spmd_dp/output/rows.py): the record plus its result under `${name}`, the extras only
when asked, and a finished batch's rows: bad records left out, refused ones to the errors file with their position
and key, metadata and token counts; with input_format=openai_batch the OpenAI output line instead."""

from spmd_dp.config import load_config
from spmd_dp.engines.base import FAILED, REJECTED, SKIPPED, Completion, Logprobs
from spmd_dp.output.rows import BAD_RECORD, RowShaper, float32_columns, output_row

REC = {"id": "a", "prompt": "hello there", "extra": [1, 2]}


def test_the_record_keeps_its_fields_and_gets_its_result():
    row = output_row(REC, "out", Completion("0:0", ["hi"], finish_reason="stop"), None)
    assert row == {**REC, "out": "hi"} and "out" not in REC  # the input record is not changed
    assert output_row(REC, "out", Completion("0:0", ["a", "b"]), None)["out"] == ["a", "b"]  # n > 1: a list
    assert output_row(REC, "emb", Completion("0:0", value=[0.5, 0.25]), None)["emb"] == [0.5, 0.25]  # pooling
    assert output_row(REC, "s", Completion("0:0", value=0.75), None)["s"] == 0.75


def test_token_ids_and_logprobs_only_when_asked():
    c = Completion("0:0", ["x y"], token_ids=[[5, 6]])
    assert "out_token_ids" not in output_row(REC, "out", c, None)  # the engine gave them, nobody asked
    assert output_row(REC, "out", c, None, token_ids=True)["out_token_ids"] == [5, 6]
    lp = Logprobs([-0.1, -0.2], [[5, 9], [6, 1]], [[-0.1, -2.0], [-0.2, -3.0]], tokens=["x", " y"])
    plp = Logprobs([None, -1.5], [[], [4]], [[], [-1.5]], token_ids=[1, 4])
    row = output_row(REC, "out", Completion("0:0", ["x y"], token_ids=[[5, 6]], logprobs=[lp], prompt_logprobs=plp),
                     {"finish_reason": "length"})
    assert row["out_token_ids"] == [5, 6]  # logprobs bring the ids they belong to
    assert row["out_logprobs"] == {"logprobs": [-0.1, -0.2], "top_ids": [[5, 9], [6, 1]],
                                   "top_logprobs": [[-0.1, -2.0], [-0.2, -3.0]]}  # column-wise, no token text
    assert row["out_prompt_logprobs"] == {"token_ids": [1, 4], "logprobs": [None, -1.5], "top_ids": [[], [4]],
                                          "top_logprobs": [[], [-1.5]]}
    assert row["out_metadata"] == {"finish_reason": "length"}
    assert float32_columns("out") == ["out", "out_logprobs", "out_prompt_logprobs"]


def test_a_batch_shaped_bad_and_refused_records_apart():
    cfg = load_config(["name=out", "return_metadata=true"])
    records = [REC, None, {"id": "c", "prompt": "p"}, {"id": "d", "prompt": "p"}, {"id": "e", "prompt": "q r"}]
    done = [Completion("0:0", ["hi"], prompt_tokens=2, output_tokens=1, finish_reason="stop"),
            Completion("0:1", error=BAD_RECORD, error_kind=SKIPPED),  # the scan reported it already
            Completion("0:2", error="prompt too long", error_kind=REJECTED),
            Completion("0:3", error="engine error", error_kind=FAILED),
            Completion("0:4", ["q"], prompt_tokens=2, output_tokens=1, finish_reason="length", truncated_from=9)]
    out = RowShaper(cfg, rank=3).shape(12, 100, records, done, tries=[0, 0, 0, 2, 1])
    assert [r["id"] for r in out.rows] == ["a", "e"]
    assert out.rows[0]["out_metadata"] == {"finish_reason": "stop", "prompt_tokens": 2, "output_tokens": 1,
                                           "rank": 3, "batch": 12}
    assert out.rows[1]["out_metadata"]["truncated_from"] == 9 and out.rows[1]["out_metadata"]["retries"] == 1
    assert out.errors == [{"position": 102, "key": "c", "error": "rejected by the engine: prompt too long"},
                          {"position": 103, "key": "d", "error": "failed in the engine: engine error"}]
    assert (out.prompt_tokens, out.output_tokens) == (4, 2)  # the rows written, not the refused ones
    plain = RowShaper(load_config(["name=res"]), 0).shape(0, 0, [REC], [done[0]], [0])
    assert plain.rows == [{**REC, "res": "hi"}]  # no metadata unless asked


def test_openai_batch_rows_are_output_lines_errors_included():
    cfg = load_config(["input_format=openai_batch", "model_name=m"])
    line = {"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    out = RowShaper(cfg, 0).shape(0, 0, [line, dict(line, custom_id="c2")],
                                  [Completion("0:0", ["y"], prompt_tokens=1, output_tokens=1, finish_reason="stop"),
                                   Completion("0:1", error="too long", error_kind=REJECTED)], [0, 0])
    assert [r["custom_id"] for r in out.rows] == ["c1", "c2"] and out.errors == []  # every request has its line
    assert out.rows[0]["response"]["body"]["choices"][0]["text"] == "y" and out.rows[0]["error"] is None
    assert out.rows[1]["error"] == {"code": "invalid_request", "message": "too long"}
    assert (out.prompt_tokens, out.output_tokens) == (1, 1)
