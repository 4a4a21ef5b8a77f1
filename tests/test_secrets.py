"""A secret given through storage_options is used (a real S3-protocol server checks it) and found in no file under
the output folder and in no line the run prints: a 2-rank run with its status and metrics server, a preflight, a
failed run, --cfg job."""

import json
import time
import urllib.request

import pytest

from spmd_dp.testing import launch, make_records, running, spmd
from tests.helpers import S3_NO_METADATA, free_port, s3_server  # (credentials from storage_options only)

pytestmark = pytest.mark.slow  # a 2-rank run, a preflight, a failed run

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

KEY_ID, SECRET = "AKIDSPMDTESTKEY0001", "s3cr3t+Do/Not-Leak-42"


@pytest.fixture(scope="module")
def bucket():
    """A real S3-protocol server (moto's, on localhost) with s3://secret-inputs/data/: two JSONL shards."""
    records = make_records(900, words=5)
    shards = {f"secret-inputs/data/part-{k}.jsonl":
              "".join(json.dumps(r) + "\n" for r in records[k * 450:(k + 1) * 450]).encode() for k in range(2)}
    with s3_server(shards, key=KEY_ID, secret=SECRET) as endpoint:
        yield endpoint, None, records


def args(tmp_path, path, *extra, name="out"):
    return [f"input_data_path={path}", f"output_dir={tmp_path / 'out'}", f"name={name}", "inference_engine=echo",
            "generation_options.max_tokens=3", "batch_size=32", *extra]


def no_secret_in(tmp_path, texts):
    for where, text in texts.items():
        for s in (KEY_ID, SECRET):
            assert s not in text, f"{s!r} in {where}"
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) >= 5
    for p in files:
        data = p.read_bytes()
        for s in (KEY_ID, SECRET):
            assert s.encode() not in data, f"{s!r} in {p}"


def test_a_storage_secret_is_in_no_file_and_no_log_line(bucket, tmp_path, monkeypatch):
    import os

    endpoint, _, records = bucket
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)  # the credentials come from storage_options only
    given = [f"+storage_options.endpoint_url={endpoint}", f"+storage_options.key={KEY_ID}",
             f"+storage_options.secret={SECRET}"]
    port = free_port()
    scraped = ""
    with running(launch(args(tmp_path, "s3://secret-inputs/data/", *given, f"metrics_port={port}",
                             "engine_options.echo_delay_s=0.01"),
                        nproc=2, env=S3_NO_METADATA, log=tmp_path / "run.log")) as p:
        while p.poll() is None and not scraped:
            try:
                scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                time.sleep(0.2)
        assert scraped and 'spmd_dp_records_total{name="out"} 900.0' in scraped
        assert p.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert (tmp_path / "out" / "out.jsonl").read_text().count("\n") == len(records)  # the key was used: it read S3
    config = (tmp_path / "out" / "out.config.yaml").read_text()
    assert "secret: '***'" in config and "key: '***'" in config and f"endpoint_url: {endpoint}" in config
    pre = spmd(args(tmp_path, "s3://secret-inputs/data/", *given, "preflight=true", name="pre"), nproc=2,
               env=S3_NO_METADATA)
    assert pre.returncode == 0 and "spmd_dp preflight of pre" in pre.stdout, pre.stderr[-3000:]
    bad = spmd(args(tmp_path, "s3://secret-inputs/nothing-here/*.jsonl", *given, name="bad"), env=S3_NO_METADATA)
    assert bad.returncode == 2 and "nothing-here/*.jsonl does not exist" in bad.stderr
    job = spmd(["--cfg", "job", *args(tmp_path, "s3://secret-inputs/data/", *given)], env=S3_NO_METADATA)
    assert job.returncode == 0 and "secret: '***'" in job.stdout
    no_secret_in(tmp_path, {"run's output": (tmp_path / "run.log").read_text(), "metrics": scraped,
                            "preflight's stdout": pre.stdout, "preflight's stderr": pre.stderr,
                            "a failed run's": bad.stderr, "--cfg job": job.stdout})
