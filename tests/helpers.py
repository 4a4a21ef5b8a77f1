"""What several test files share and scripts do not (theirs is in spmd_dp/testing.py): the one-line error check,
the same records in every input form, a stand-in engine and one rank's generation loop around it, an asserting
wait. A helper module, not a test file: no test imports from another test file."""

from __future__ import annotations

import gzip
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator, List

import torch.distributed as dist

from spmd_dp.config import load_config
from spmd_dp.control.claims import Claims, dynamic_batches
from spmd_dp.control.messages import BatchDone, RankEvent, RankState, RankStats
from spmd_dp.control.outbox import Outbox
from spmd_dp.control.peers import Peers
from spmd_dp.engines import Completion
from spmd_dp.generation import GenerationLoop
from spmd_dp.inputs import RecordSpec, scan_input
from spmd_dp.output.sink import Sink
from spmd_dp.prompting.prompts import PromptBuilder
from spmd_dp.testing import wait_until, write_jsonl


def one_line(p) -> str:
    """The run's stderr holds one spmd_dp line per process and no traceback of spmd_dp's. (When ranks
    fail, torchrun itself ends with its ChildFailedError report, which shows our line for each rank.)"""
    assert "/spmd_dp/" not in p.stderr and ("Traceback" not in p.stderr or "ChildFailedError" in p.stderr), \
        p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("spmd_dp:")]
    assert lines and len(set(lines)) == 1, p.stderr[-3000:]
    if "ChildFailedError" in p.stderr:
        assert f"traceback : {lines[0]}" in p.stderr  # torchrun's summary names the reason
    return lines[0]


def free_port() -> int:
    """A TCP port nobody listens on now (metrics_port in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout, proc=None, what="") -> None:
    """Wait (bounded) for cond(); fail the test, with the run's output if it ended, when it does not come."""
    if not wait_until(cond, timeout, proc):
        ended = proc is not None and proc.poll() is not None
        tail = proc.stdout.read()[-3000:] if ended and proc.stdout else ""
        raise AssertionError(f"{'the run ended' if ended else 'timed out'} while waiting for {what}: {tail}")


# --- the same records in every form a user may hold them ---------------------------------------------------

RECORDS = [{"id": f"r{i:04d}", "prompt": f"w{i} a b c d e", "n": i} for i in range(700)]


def write_forms(d: Path, records=RECORDS) -> Path:
    """The records as: JSONL shards (beside a README), one .jsonl.gz, one .jsonl.zst, two Parquet files of
    several row groups each, a Hugging Face dataset (save_to_disk, several Arrow shards), and one JSONL file."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = [json.dumps(r) + "\n" for r in records]
    third = len(lines) // 3 + 1
    (d / "shards").mkdir(parents=True)
    for k in range(3):
        (d / "shards" / f"part-{k}.jsonl").write_text("".join(lines[k * third:(k + 1) * third]))
    (d / "shards" / "README.md").write_text("not input")
    (d / "all.jsonl").write_text("".join(lines))
    with gzip.open(d / "all.jsonl.gz", "wt") as f:
        f.write("".join(lines))
    (d / "all.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines).encode()))
    (d / "parquet").mkdir()
    table = pa.Table.from_pylist(records)
    half = len(records) * 4 // 7
    pq.write_table(table.slice(0, half), d / "parquet" / "a.parquet", row_group_size=64)
    pq.write_table(table.slice(half), d / "parquet" / "b.parquet", row_group_size=50)
    datasets.Dataset.from_list(records).save_to_disk(str(d / "hf"), max_shard_size="8KB")
    return d


# --- a stand-in engine and one rank's generation loop around it ----------------------------------------------

class FakeEngine:
    """Runs `capacity` requests at a time, each finishing after one step; records what was queued."""

    def __init__(self, capacity, kv_tokens):
        self.capacity, self.kv_tokens = capacity, kv_tokens
        self.queue: List = []
        self.max_queued = 0

    def add(self, request):
        self.queue.append(request)
        self.max_queued = max(self.max_queued, len(self.queue))
        return None

    def step(self):
        done, self.queue = self.queue[:self.capacity], self.queue[self.capacity:]
        return [Completion(r.request_id, ["x"], prompt_tokens=1, output_tokens=1) for r in done]

    def close(self):
        pass


class Loopback:
    """No control thread here: a finished batch counts as committed by rank 0 at once."""

    def __init__(self, peers):
        self.peers, self.sent = peers, []

    def __call__(self, message):
        self.sent.append(message)
        self.peers.view = replace(self.peers.view, committed=self.peers.view.committed + 1)


def run_loop(tmp_path, records, batch_size, engine, *overrides):
    """One rank's generation loop over `records` (dynamic schedule, world of one) on a stand-in engine."""
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    cfg = load_config([f"batch_size={batch_size}", *overrides])
    prompts = PromptBuilder(cfg)
    index, _ = scan_input(inp, RecordSpec("id", prompts.check), batch_size)
    batches = dynamic_batches([(0, len(records))], batch_size)
    claims = Claims(dist.HashStore(), batches, "dynamic", 0, 1)
    outbox = Outbox()
    outbox.state = RankState.READY
    peers = Peers(0, 1, outbox)
    loopback = Loopback(peers)
    stats = GenerationLoop(cfg, engine, claims, index, prompts, outbox, peers, Sink(loopback), 0, RankStats(0),
                           len(batches)).run()
    events = [outbox.queue.get() for _ in range(outbox.queue.qsize())]
    assert [e.kind for e in events][:1] == ["generating"]  # the sink took every batch; the loop put only its events
    assert all(isinstance(e, RankEvent) for e in events)
    assert all(isinstance(m, BatchDone) for m in loopback.sent)
    return loopback.sent, stats


def token_records(n):
    return [{"id": i, "prompt": [1] * 20} for i in range(n)]


# S3: a real S3-protocol server on localhost (moto's standalone server, over HTTP), what the S3 tests share
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
S3_NO_METADATA = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                  "AWS_CONFIG_FILE": "/nonexistent"}  # no credentials from this machine's files or cloud metadata


@contextmanager
def s3_server(objects: Dict[str, bytes], key: str = "testing", secret: str = "testing") -> Iterator[str]:
    """A server holding `objects` ("bucket/key": bytes); yields its endpoint URL. moto keeps its buckets per process
    (a pytest worker runs many modules): each module names buckets of its own."""
    import logging

    import s3fs
    from moto import server as moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=key, secret=secret)
        for bucket in sorted({name.split("/", 1)[0] for name in objects}):
            fs.mkdir(bucket)
        for name, data in objects.items():
            fs.pipe(name, data)
        yield endpoint
    finally:
        server.stop()
