"""Bad input and misconfiguration, end to end: one clear line and exit 2 before any engine starts,
on_bad_record=skip, nothing lost, never a hang, never a traceback."""

import json
import random
import time

import pytest

from spmd_dp.testing import echo_args, make_records, read_jsonl, spmd, write_jsonl
from tests.helpers import one_line


CASES = {
    "missing file": (None, "does not exist; set data_dir= and input_data_path="),
    "empty file": (b"", "holds no records"),
    "malformed JSON": (b'{"id": 1, "prompt": "a b"}\n{"id": 2, "prompt": "x\n', "in.jsonl:2: malformed JSON"),
    "not an object": (b'{"id": 1, "prompt": "a"}\n[1, 2]\n', "in.jsonl:2: a record must be a JSON object, got list"),
    "missing key": (b'{"prompt": "a"}\n', "in.jsonl:1: no primary key field 'id' (set primary_key=<field>)"),
    "duplicate key": (b'{"id": 7, "prompt": "a"}\n\n{"id": 7, "prompt": "b"}\n',
                      "in.jsonl:3: duplicate primary key 7 (first at line 1)"),
    "missing prompt": (b'{"id": 1, "text": "a"}\n', "in.jsonl:1: no prompt field 'prompt'"),
    "non-string prompt": (b'{"id": 1, "prompt": {"a": 1}}\n', "in.jsonl:1: prompt field 'prompt' must be a string"),
    "invalid UTF-8": (b'{"id": 1, "prompt": "caf\xe9"}\n', "in.jsonl:1: invalid UTF-8 at byte"),
    "bad record options": (b'{"id": 1, "prompt": "a", "generation_options": {"temprature": 1}}\n',
                           "in.jsonl:1: 'generation_options' has unknown fields ['temprature']"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    content, expected = CASES[case]
    inp = tmp_path / "data" / "in.jsonl"
    inp.parent.mkdir()
    if content is not None:
        inp.write_bytes(content)
    p = spmd(echo_args(tmp_path, inp))
    assert p.returncode == 2
    line = one_line(p)
    assert line.startswith("spmd_dp: input error: ") and expected in line, line
    assert not (tmp_path / "out" / "out.jsonl").exists()


def test_blank_lines_are_ignored_and_a_huge_record_runs(tmp_path):
    huge = " ".join(f"w{i}" for i in range(400_000))  # ~3 MB prompt
    inp = tmp_path / "data" / "in.jsonl"
    inp.parent.mkdir()
    inp.write_text(f'\n{{"id": 1, "prompt": "a b c d e"}}\n   \n{{"id": 2, "prompt": "{huge}"}}\n\n')
    p = spmd(echo_args(tmp_path, inp), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["out"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")] == ["a b c d", "w0 w1 w2 w3"]


def test_count_of_bad_records_and_the_way_out(tmp_path):
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2}, {"id": 3}])
    line = one_line(spmd(echo_args(tmp_path, inp)))
    assert line.endswith("(and 1 more bad records); fix the input, or set on_bad_record=skip to write bad records "
                         "to the errors file and run the rest")


def test_skip_writes_bad_records_to_the_errors_file_and_runs_the_rest(tmp_path):
    good = make_records(30, words=5)
    lines = [json.dumps(r) for r in good]
    lines.insert(3, '{"id": "x", "prompt": ')
    lines.insert(10, json.dumps({"id": good[0]["id"], "prompt": "dup"}))
    lines.insert(20, '"just a string"')
    lines.insert(25, json.dumps({"id": "long", "prompt": " ".join(["w"] * 50)}))  # refused: > max_model_len=20
    inp = tmp_path / "data" / "in.jsonl"
    inp.parent.mkdir()
    inp.write_text("\n".join(lines) + "\n")
    p = spmd(echo_args(tmp_path, inp, "on_bad_record=skip", "batch_size=4", "engine_options.max_model_len=20"),
             nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")] == [r["id"] for r in good]
    errors = read_jsonl(tmp_path / "out" / "out.errors.jsonl")
    assert [e["line"] if "line" in e else e["key"] for e in errors] == [4, 11, 21, "long"]
    assert "malformed JSON" in errors[0]["error"] and "duplicate primary key" in errors[1]["error"]
    assert "longer than max_model_len=20" in errors[3]["error"]
    assert "3 bad records in" in p.stderr and "4 records skipped" in p.stderr
    metrics = json.loads((tmp_path / "out" / "out.metrics.json").read_text())
    assert metrics["total"]["skipped_records"] == 4 and metrics["total"]["records"] == 30


def test_a_prompt_too_long_fails_the_run_by_default_naming_the_record(tmp_path):
    inp = write_jsonl(tmp_path / "data" / "in.jsonl", [{"id": "ok", "prompt": "a b"},
                                                       {"id": "big", "prompt": " ".join(["w"] * 50)}])
    p = spmd(echo_args(tmp_path, inp, "engine_options.max_model_len=20"), timeout=120)
    assert p.returncode == 1
    line = one_line(p)
    assert "record id='big'" in line and "longer than max_model_len=20" in line and "on_bad_record=skip" in line
    # the echo engine counts words, and says so; the fix names on_long_prompt too (issue 25)
    assert "the prompt (50 words)" in line and "set on_long_prompt=truncate_left, truncate_right or skip" in line
    p = spmd(echo_args(tmp_path, inp, "engine_options.max_model_len=20", "on_long_prompt=skip"), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    error = read_jsonl(tmp_path / "out" / "out.errors.jsonl")[0]["error"]
    assert "the prompt (50 words) is longer than max_model_len=20" in error and "tokens" not in error, error


@pytest.mark.parametrize("override,expected", [
    ("output_dir=/proc/spmd_dp_cannot_write_here", "output error:"),
    ("model_name=/nonexistent/model", "model_name='/nonexistent/model' does not exist"),
    ("inference_engine=tgi", "inference_engine='tgi' is not allowed; use one of vllm_dp, echo"),
    ("engine_options.gpus_per_dp_rank=-1", "engine_options.gpus_per_dp_rank=-1 is not allowed"),
    ("batch_timeout=0", "batch_timeout=0.0 is not allowed"),
    ("on_bad_record=ignore", "on_bad_record='ignore' is not allowed; use one of fail, skip"),
])
def test_misconfiguration_is_one_line_and_exit_2(tmp_path, records_file, override, expected):
    args = echo_args(tmp_path, records_file, override)
    if override.startswith("model_name"):
        args = [a for a in args if a != "inference_engine=echo"]  # the path is checked for vLLM before it loads
    p = spmd(args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert expected in one_line(p)


def test_environment_errors(tmp_path, records_file):
    # spmd() drops torchrun's variables (clean_env): half a launcher's set goes in on top of that
    for half_set, missing in [({"RANK": "0", "WORLD_SIZE": "2"},
                               "RANK, WORLD_SIZE set but LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT not"),
                              ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                               "MASTER_ADDR, MASTER_PORT set but RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE not")]:
        p = spmd(echo_args(tmp_path, records_file), env=half_set, timeout=60)
        assert p.returncode == 2, p.stderr[-2000:]
        assert missing in one_line(p)
        assert not (tmp_path / "out").exists()  # refused before anything was written
    p = spmd([a for a in echo_args(tmp_path, records_file) if a != "inference_engine=echo"],
             env={"CUDA_VISIBLE_DEVICES": "0"}, timeout=60)
    assert p.returncode == 2 and "CUDA_VISIBLE_DEVICES=0 names GPUs but this node has none" in one_line(p)


def test_trust_remote_code_stays_off_unless_set():
    from spmd_dp.config import load_config
    from spmd_dp.launch.devices import DeviceSlice
    from spmd_dp.engines.vllm_engine import engine_kwargs

    cpu = DeviceSlice("cpu", ("0",), 1)
    assert engine_kwargs(load_config([]), cpu)["trust_remote_code"] is False
    assert engine_kwargs(load_config(["engine_options.trust_remote_code=true"]), cpu)["trust_remote_code"] is True


# -- robustness: seeded corrupted inputs --------------------------------------------------------------
def corrupt(rng: random.Random, records):
    """Lines with corruptions from a seeded generator; returns (lines, number of bad records)."""
    lines, bad = [], 0
    kinds = ["truncated", "bytes", "wrong type", "duplicate", "deep", "not object", "no prompt", "blank"]
    for r in records:
        line = json.dumps(r)
        if rng.random() < 0.25:
            kind = rng.choice(kinds)
            if kind == "truncated":
                line = line[:rng.randrange(1, len(line) - 1)]
            elif kind == "bytes":
                line = line[:5] + "".join(chr(rng.randrange(0x80, 0x2FF)) for _ in range(4)) + "\x00\x07"
            elif kind == "wrong type":
                line = json.dumps({**r, "prompt": rng.choice([1, 2.5, None, [1, "a"], {"x": 1}, True])})
            elif kind == "duplicate":
                line = json.dumps({**r, "id": records[0]["id"]})
            elif kind == "deep":
                line = json.dumps({**r, "prompt": "x", "meta": json.loads("[" * 100 + "]" * 100)})
                bad -= 1  # deep nesting elsewhere in a record is fine
            elif kind == "not object":
                line = json.dumps(rng.choice([[r["id"]], r["prompt"], 3, None]))
            elif kind == "no prompt":
                line = json.dumps({"id": r["id"]})
            elif kind == "blank":
                line, bad = "   ", bad - 1  # blank lines are not records
            bad += 1
        lines.append(line)
    if lines and records and json.dumps(records[0]) != lines[0]:
        lines[0], bad = json.dumps(records[0]), bad - 1  # keep the first record (the duplicates' original)
    return lines, bad


@pytest.mark.parametrize("seed", range(6))
def test_corrupted_inputs_end_in_bounded_time_with_exit_0_or_2(tmp_path, seed):
    rng = random.Random(seed)
    records = make_records(rng.randrange(20, 60), words=6)
    lines, n_bad = corrupt(rng, records)
    raw = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    if seed % 3 == 0:
        raw += b'{"id": "tail", "prompt": "\xff\xfe"}\n'  # invalid UTF-8
        n_bad += 1
    inp = tmp_path / "data" / "in.jsonl"
    inp.parent.mkdir()
    inp.write_bytes(raw)
    nproc = None if seed % 2 == 0 else 2
    t0 = time.monotonic()
    strict = spmd(echo_args(tmp_path, inp, "batch_size=4"), nproc=nproc, timeout=120)
    skip = spmd(echo_args(tmp_path, inp, "batch_size=4", "on_bad_record=skip", "name=skip"), nproc=nproc, timeout=120)
    assert time.monotonic() - t0 < 200
    if n_bad:
        assert strict.returncode == (2 if nproc is None else 1)  # under torchrun each rank exits 2
        assert one_line(strict).startswith("spmd_dp: input error:")
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert "Traceback" not in skip.stderr and "spmd_dp: " not in skip.stderr
    errors = read_jsonl(tmp_path / "out" / "skip.errors.jsonl")
    assert len(errors) == n_bad
    out = read_jsonl(tmp_path / "out" / "skip.jsonl")
    assert len(out) + n_bad == sum(1 for ln in raw.split(b"\n") if ln.strip())
    assert len({r["id"] for r in out}) == len(out)
