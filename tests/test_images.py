"""Images in prompts, up to the engine (real torchrun, gloo, the echo engine, which opens each image as vLLM's engine
does and reports its size per record): every form a user holds images in, bad images found by the scan (exit 2, or
the errors file), output, resume, sharded output, retries and per-record options as for text. The real vLLM CPU
engine with a vision model: tests/test_images_vllm.py."""

import base64
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spmd_dp.config import load_config
from spmd_dp.inputs import RecordSpec, scan_input
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.testing import (image_bytes, launch, read_jsonl, running, spmd, wait_for_batches,
                             write_image_records, write_jsonl)
from tests.echo_jobs import run_echo_workflow
from tests.helpers import S3_CREDENTIALS, S3_NO_METADATA, one_line, s3_server

SIZES = ((64, 48), (20, 30), (96, 96))


def run_args(tmp_path, data_dir, input_path, *extra, name="out"):
    return [f"data_dir={data_dir}", f"input_data_path={input_path}", f"output_dir={tmp_path / 'out'}", f"name={name}",
            "inference_engine=echo", "generation_options.max_tokens=4", "batch_size=4", "return_metadata=true",
            "image_field=image", *extra]


def data_url(w, h, fmt="PNG"):
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(image_bytes(w, h, fmt)).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 records with one image each (a file under images/, of SIZES in turn) in every form, and the same records
    as chats of image parts, as a Parquet binary column, as a Hugging Face Image feature, as an OpenAI batch file."""
    import datasets

    d = tmp_path_factory.mktemp("images")
    recs = write_image_records(d, 40, SIZES, fmt="PNG")
    write_jsonl(d / "paths.jsonl", recs)
    # a chat per record: its own image as a path part, the first one again as a data: URL (two images each)
    chats = [{"id": r["id"], "messages": [{"role": "user", "content": [
        image_part(r["image"]), image_part(data_url(*SIZES[0])), {"type": "text", "text": r["prompt"]}]}]}
        for r in recs]
    write_jsonl(d / "chats.jsonl", chats)
    blobs = [(d / r["image"]).read_bytes() for r in recs]
    pq.write_table(pa.table({"id": [r["id"] for r in recs], "prompt": [r["prompt"] for r in recs],
                             "image": pa.array(blobs, pa.binary())}), d / "binary.parquet", row_group_size=8)
    features = datasets.Features({"id": datasets.Value("string"), "prompt": datasets.Value("string"),
                                  "image": datasets.Image()})
    datasets.Dataset.from_dict({"id": [r["id"] for r in recs], "prompt": [r["prompt"] for r in recs],
                                "image": [{"bytes": b, "path": None} for b in blobs]},
                               features=features).save_to_disk(str(d / "hf"), max_shard_size="20KB")
    batch = [{"custom_id": r["id"], "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "max_tokens": 3, "messages": c["messages"]}} for r, c in zip(recs, chats)]
    write_jsonl(d / "batch.jsonl", batch)
    return d, recs


def sizes_of(rows, name="out"):
    return [row[f"{name}_metadata"]["images"] for row in rows]


FORMS = {"paths": "paths.jsonl", "binary": "binary.parquet", "hf": "hf"}


@pytest.fixture(scope="module")
def forms_run(data, tmp_path_factory):
    """One run of 2 ranks (tests/echo_jobs.py) over the records in each form (a node each, named for the form)."""
    d, _ = data
    folder = tmp_path_factory.mktemp("forms")
    nodes = [{"id": name, "type": "text_prompt", "dependencies": [], "params": {
        "name": name, "data_dir": str(d), "input_data_path": form, "inference_engine": "echo",
        "generation_options": {"max_tokens": 4}, "batch_size": 4, "return_metadata": True, "image_field": "image",
        "schedule": "static"}} for name, form in FORMS.items()]
    return run_echo_workflow(folder, nodes, 2)


@pytest.mark.parametrize("name", list(FORMS))
def test_an_image_field_in_each_form_reaches_the_engines_of_two_ranks(data, forms_run, name):
    d, recs = data
    rows = forms_run.rows(name)
    assert [r["id"] for r in rows] == [r["id"] for r in recs]  # every record once, in input order
    assert sizes_of(rows, name) == [[[r["width"], r["height"]]] for r in recs]  # each record's own image, as generated
    assert {row[f"{name}_metadata"]["rank"] for row in rows} == {0, 1}  # read and opened by both ranks, each its own
    assert rows[3][name] == "Describe this image in"


def test_chat_image_parts_data_urls_and_several_images_per_prompt(data, tmp_path):
    d, recs = data
    p = spmd(run_args(tmp_path, d, "chats.jsonl", "image_field=null", "engine_options.limit_mm_per_prompt=2"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "out.jsonl")
    assert sizes_of(rows) == [[[r["width"], r["height"]], list(SIZES[0])] for r in recs]
    # image_field with a chat: its images join the last user turn before the text (three images each)
    field = [{**c, "image": r["image"]} for c, r in zip(read_jsonl(d / "chats.jsonl"), recs)]
    write_jsonl(tmp_path / "d" / "both.jsonl", field)
    (tmp_path / "d" / "images").symlink_to(d / "images")
    p = spmd(run_args(tmp_path, tmp_path / "d", "both.jsonl", "name=both"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "both.jsonl")
    assert sizes_of(rows, "both")[5] == [list(SIZES[2]), list(SIZES[2]), list(SIZES[0])]


def test_openai_batch_file_with_image_parts(data, tmp_path):
    d, recs = data
    p = spmd([f"data_dir={d}", "input_data_path=batch.jsonl", f"output_dir={tmp_path / 'out'}", "name=out",
              "inference_engine=echo", "input_format=openai_batch"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "out.jsonl")
    assert [r["custom_id"] for r in rows] == [r["id"] for r in recs]
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in rows)
    assert rows[0]["response"]["body"]["choices"][0]["message"]["content"] == "Describe this image"


def test_sharded_output_retries_and_per_record_options(data, tmp_path):
    d, recs = data
    own = [{**r, "generation_options": {"max_tokens": 2}} if i % 5 == 0 else r for i, r in enumerate(recs)]
    write_jsonl(tmp_path / "d" / "in.jsonl", own)
    (tmp_path / "d" / "images").symlink_to(d / "images")
    p = spmd(run_args(tmp_path, tmp_path / "d", "in.jsonl", "output_mode=sharded", "merge=true", "max_retries=2",
                      f"engine_options.echo_fail_keys=[{recs[7]['id']},{recs[30]['id']}]",
                      "engine_options.echo_fail_times=2"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "out.jsonl")  # merged from the ranks' shards
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    assert sizes_of(rows) == [[[r["width"], r["height"]]] for r in recs]
    assert rows[7]["out_metadata"]["retries"] == 2 and rows[30]["out_metadata"]["retries"] == 2
    assert rows[5]["out"] == "Describe this" and rows[6]["out"] == "Describe this image in"


def test_an_interrupted_run_resumes_with_its_images(data, tmp_path):
    d, recs = data
    args = run_args(tmp_path, d, "paths.jsonl", "engine_options.echo_delay_s=0.02", "batch_size=2")
    with running(launch(args, nproc=2, log=tmp_path / "first.log")) as proc:
        committed = wait_for_batches(tmp_path / "out" / "out.journal.jsonl", 5, proc)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on: the ranks drain and stop
        proc.wait(timeout=120)
    assert proc.returncode != 0 and 5 <= committed < 20, (tmp_path / "first.log").read_text()[-3000:]
    again = spmd(args, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stderr
    rows = read_jsonl(tmp_path / "out" / "out.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    assert sizes_of(rows) == [[[r["width"], r["height"]]] for r in recs]


# -- bad images -----------------------------------------------------------------------------------------------

def verdicts(tmp_path, records, *overrides):
    """The scan's verdict on each record (None: valid), before any model loads."""
    cfg = load_config([f"data_dir={tmp_path}", "image_field=image", *overrides])
    inp = write_jsonl(tmp_path / "scan.jsonl", records)
    _, bad = scan_input(inp, RecordSpec(cfg.primary_key, PromptBuilder(cfg).check), 4, skip_bad=True)
    reasons = {b.position: b.reason for b in bad}
    return [reasons.get(i) for i in range(len(records))]


def test_the_scan_finds_bad_images_cheaply(tmp_path):
    (tmp_path / "ok.png").write_bytes(image_bytes(8, 8))
    (tmp_path / "notes.txt").write_text("not an image at all")
    (tmp_path / "pic.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    good = [{"id": 0, "prompt": "a", "image": "ok.png"}, {"id": 1, "prompt": "a", "image": str(tmp_path / "ok.png")},
            {"id": 2, "prompt": "a", "image": data_url(4, 4, "JPEG")}, {"id": 3, "prompt": "a", "image": None},
            {"id": 4, "prompt": "a", "image": base64.b64encode(image_bytes(5, 5, "GIF")).decode()},
            {"id": 5, "prompt": "a", "image": {"bytes": base64.b64encode(image_bytes(5, 5)).decode(), "path": "x"}},
            {"id": 6, "prompt": "a", "image": {"bytes": None, "path": "ok.png"}},
            {"id": 7, "prompt": "a", "image": "s3://bucket/never-read-by-the-scan.png"},
            {"id": 8, "messages": [{"role": "user", "content": [image_part("ok.png"), {"type": "text", "text": "a"}]}]}]
    bad = [({"image": "missing.png"}, f"image 1 (missing.png): cannot read {tmp_path}/missing.png (No such file"),
           ({"image": "notes.txt"}, "image 1 (notes.txt): not an image in a format vLLM reads (PNG, JPEG"),
           ({"image": "pic.heic"}, "not an image in a format vLLM reads"),
           ({"image": ["ok.png", "data:image/png;base64,!!!"]}, "image 2 (data: URL): the data: URL's base64 is not"),
           ({"image": "data:text/plain,hello"}, "a data: URL must be base64"),
           ({"image": base64.b64encode(b"%PDF-1.4 " * 100).decode()}, "image 1 (inline image bytes): not an image"),
           ({"image": {"bytes": None, "path": None}}, "an image object must hold 'bytes' or a 'path'"),
           ({"image": 7}, "an image is a path, a URL, a data: URL or base64 bytes, got int"),
           ({"text": "no field"}, "no image field 'image' (set image_field=<field>"),
           ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "an image part holds its image as"),
           ({"messages": [{"role": "user", "content": [{"type": "image", "path": "ok.png"}]}]},
            "or an image part {\"type\": \"image_url\""),
           ({"image": ["ok.png"] * 3}, "the prompt has 3 images; engine_options.limit_mm_per_prompt=2 allows 2")]
    records = good + [{"id": 100 + i, "prompt": "a", **fields} for i, (fields, _) in enumerate(bad)]
    got = verdicts(tmp_path, records, "engine_options.limit_mm_per_prompt=2")
    assert got[:len(good)] == [None] * len(good), got
    for verdict, (_, expected) in zip(got[len(good):], bad):
        assert verdict is not None and expected in verdict, (verdict, expected)
    # vLLM's own argument sets the limit too
    assert "limit_mm_per_prompt=1 allows 1" in verdicts(tmp_path, [{"id": 0, "prompt": "a", "image": ["ok.png"] * 2}],
                                                         "+engine_options.vllm_kwargs.limit_mm_per_prompt.image=1")[0]


def test_a_bad_image_is_one_line_and_exit_2_or_the_errors_file(data, tmp_path):
    d, recs = data
    bad = [dict(r) for r in recs]
    bad[33]["image"] = "images/gone.png"
    bad[12]["image"] = "paths.jsonl"  # not an image
    write_jsonl(tmp_path / "d" / "in.jsonl", bad)
    (tmp_path / "d" / "images").symlink_to(d / "images")
    (tmp_path / "d" / "paths.jsonl").symlink_to(d / "paths.jsonl")
    # the engines would take 10 minutes to start: the scan's verdict ends the run before (the test allows 2)
    p = spmd(run_args(tmp_path, tmp_path / "d", "in.jsonl", "engine_options.echo_start_s=600"), nproc=2, timeout=120)
    assert p.returncode == 1 and p.stderr.count("exitcode  : 2") == 2  # torchrun's 1: each rank exits 2
    line = one_line(p)
    assert "in.jsonl:13: image 1 (paths.jsonl): not an image in a format vLLM reads" in line
    assert "(and 1 more bad records)" in line and "on_bad_record=skip" in line, line
    assert not (tmp_path / "out" / "out.jsonl").exists()
    p = spmd(run_args(tmp_path, tmp_path / "d", "in.jsonl", "on_bad_record=skip"), nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    errors = read_jsonl(tmp_path / "out" / "out.errors.jsonl")
    assert [(e["key"], "cannot read" in e["error"] or "not an image" in e["error"]) for e in errors] == \
        [(recs[12]["id"], True), (recs[33]["id"], True)]
    assert len(read_jsonl(tmp_path / "out" / "out.jsonl")) == 38


def test_an_image_broken_past_its_header_is_refused_by_the_engine(tmp_path):
    """A PNG cut after its signature passes the scan's header check; the engine cannot open it: a record the engine
    rejected (exit 1 naming it; on_bad_record=skip: the errors file). So is a file deleted after the scan."""
    (tmp_path / "ok.png").write_bytes(image_bytes(8, 8))
    (tmp_path / "cut.png").write_bytes(image_bytes(8, 8)[:12])
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "a b", "image": "ok.png"} for i in range(6)] +
                [{"id": 6, "prompt": "a b", "image": "cut.png"}])
    p = spmd(run_args(tmp_path, tmp_path, "in.jsonl"))
    assert p.returncode == 1
    assert "record id=6 (batch 1, record 6) was rejected by the engine: an image cannot be opened" in one_line(p)
    p = spmd(run_args(tmp_path, tmp_path, "in.jsonl", "on_bad_record=skip"))
    assert p.returncode == 0 and len(read_jsonl(tmp_path / "out" / "out.jsonl")) == 6
    assert read_jsonl(tmp_path / "out" / "out.errors.jsonl")[0]["key"] == 6


def test_the_weight_less_qwen2_vl_folder_loads_as_transformers_reads_it(tmp_path):
    """The GPU benchmark's model (load_format=dummy): Qwen2-VL-7B's config, its special tokens at Qwen2-VL's ids,
    its chat template placing one image placeholder per image part."""
    from transformers import AutoConfig, AutoTokenizer

    from spmd_dp.models.vision import write_folder

    write_folder("qwen2vl-7b", tmp_path / "m")
    c, t = AutoConfig.from_pretrained(tmp_path / "m"), AutoTokenizer.from_pretrained(tmp_path / "m")
    assert c.architectures == ["Qwen2VLForConditionalGeneration"] and c.text_config.hidden_size == 3584
    assert c.vision_config.depth == 32 and c.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert len(t) == 152064 and t.convert_tokens_to_ids("<|image_pad|>") == c.image_token_id == 151655
    text = t.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                               {"type": "text", "text": "Compare."}]}],
                                 tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2 and text.endswith("<|im_start|>assistant\n")
    assert t.decode(t.encode("the quick brown fox")) == "the quick brown fox"


def test_images_in_a_bucket_are_read_by_the_generating_ranks(data, tmp_path):
    """s3:// references (a real S3-protocol server on localhost, read through fsspec/s3fs with storage_options): the
    scan does not read them; each rank reads its records' images when it generates them; a missing object is then
    a record the engine rejected, named in the errors file."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    d, recs = data
    with s3_server({f"pictures/{r['image']}": (d / r["image"]).read_bytes() for r in recs[:12]}) as endpoint:
        remote = [{**r, "image": f"s3://pictures/{r['image']}"} for r in recs[:12]]
        remote[9]["image"] = "s3://pictures/images/not-there.png"
        write_jsonl(tmp_path / "d" / "in.jsonl", remote)
        p = spmd(run_args(tmp_path, tmp_path / "d", "in.jsonl", "on_bad_record=skip", "schedule=static",
                          f"+storage_options.endpoint_url={endpoint}"), nproc=2, env={**S3_CREDENTIALS, **S3_NO_METADATA})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "out.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for i, r in enumerate(recs[:12]) if i != 9]
    assert sizes_of(rows) == [[[r["width"], r["height"]]] for i, r in enumerate(recs[:12]) if i != 9]
    assert {row["out_metadata"]["rank"] for row in rows} == {0, 1}
    (error,) = read_jsonl(tmp_path / "out" / "out.errors.jsonl")
    assert error["key"] == recs[9]["id"] and "image: cannot read s3://pictures/images/not-there.png" in error["error"]
