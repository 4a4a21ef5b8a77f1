"""Prompt building: templates in a sandbox, chat conversations, token ids, per-record options."""

import pytest

from spmd_dp.config import load_config
from spmd_dp.errors import UsageError
from spmd_dp.prompting.prompts import Chat, PromptBuilder
from spmd_dp.testing import echo_args, read_jsonl, spmd, write_jsonl


def builder(tmp_path, template=None, *overrides):
    if template is not None:
        (tmp_path / "task.jinja").write_text(template)
    return PromptBuilder(load_config([f"prompts_dir={tmp_path}", "name=task", *overrides]))


def test_template_renders_record_fields(tmp_path):
    b = builder(tmp_path, "Translate {{ text }} into {{ lang | upper }}.")
    assert b.build({"id": 1, "text": "hello", "lang": "fr"}) == "Translate hello into FR."
    assert b.check({"id": 1, "text": "hello"}) == "template task.jinja: 'lang' is undefined"


def test_txt_template_and_explicit_template(tmp_path):
    (tmp_path / "task.txt").write_text("Q: {{ q }}")
    assert PromptBuilder(load_config([f"prompts_dir={tmp_path}", "name=task"])).build({"q": "x"}) == "Q: x"
    (tmp_path / "other.jinja").write_text("O: {{ q }}")
    b = PromptBuilder(load_config([f"prompts_dir={tmp_path}", "name=task", "prompt_template=other.jinja"]))
    assert b.build({"q": "y"}) == "O: y"
    with pytest.raises(UsageError, match="prompt_template='missing.jinja'"):
        PromptBuilder(load_config([f"prompts_dir={tmp_path}", "prompt_template=missing.jinja"]))
    (tmp_path / "broken.jinja").write_text("{{ q ")
    with pytest.raises(UsageError, match=r"template .*broken.jinja:1"):
        PromptBuilder(load_config([f"prompts_dir={tmp_path}", "prompt_template=broken.jinja"]))


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ text.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
])
def test_sandbox_refuses_escapes(tmp_path, attack):
    b = builder(tmp_path, attack)
    err = b.check({"id": 1, "text": "x"})
    assert err is not None and ("unsafe" in err or "undefined" in err), err


def test_chat_messages_and_chat_mode(tmp_path):
    b = PromptBuilder(load_config([]))
    msgs = [{"role": "user", "content": "hi"}]
    assert b.build({"id": 1, "messages": msgs}) == Chat(msgs)
    assert "must be a non-empty list" in b.check({"id": 1, "messages": []})
    assert "'messages'[0] must be an object" in b.check({"id": 1, "messages": ["hi"]})
    chat = PromptBuilder(load_config(["chat=true", "system_prompt=Be brief."]))
    assert chat.build({"id": 1, "prompt": "hello"}) == Chat([{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "hello"}])


def test_token_ids_and_per_record_options(tmp_path):
    b = PromptBuilder(load_config([]))
    assert b.build({"prompt": [1, 2, 3]}) == [1, 2, 3]
    assert "list of token ids" in b.check({"id": 1, "prompt": [1, "a"]})
    assert b.check({"id": 1, "prompt": "x", "generation_options": {"max_tokens": 3}}) is None
    assert "unknown fields ['wat']" in b.check({"id": 1, "prompt": "x", "generation_options": {"wat": 1}})
    req = b.request("0:0", {"id": 1, "prompt": "x", "generation_options": {"max_tokens": 3}},
                    {"max_tokens": 8, "temperature": 0.7})
    assert req.sampling == {"max_tokens": 3, "temperature": 0.7} and req.prompt == "x" and req.key == 1


def test_templates_overrides_and_metadata_through_torchrun(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "out.jinja").write_text("please summarise {{ title }} by {{ author }} now")
    records = [{"id": i, "title": f"t{i}", "author": f"a{i}"} for i in range(10)]
    records[3]["generation_options"] = {"max_tokens": 2}
    records[4]["generation_options"] = {"n": 2}
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", records)
    p = spmd(echo_args(tmp_path, inp, f"prompts_dir={prompts}", "return_metadata=true", "batch_size=3"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "out.jsonl")
    assert rows[0]["out"] == "please summarise t0 by"
    assert rows[3]["out"] == "please summarise"
    assert rows[4]["out"] == ["please summarise t4 by"] * 2
    meta = rows[0]["out_metadata"]
    assert meta["prompt_tokens"] == 6 and meta["output_tokens"] == 4 and meta["finish_reason"] == "length"
    assert meta["rank"] in (0, 1) and meta["batch"] == 0


def test_missing_template_field_stops_the_run_before_any_engine(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "out.jinja").write_text("{{ title }}")
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", [{"id": 1, "title": "a"}, {"id": 2}])
    p = spmd(echo_args(tmp_path, inp, f"prompts_dir={prompts}"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"spmd_dp: input error: {inp}:2: template out.jinja: 'title' is undefined; fix the input, or set on_bad_record=skip")
