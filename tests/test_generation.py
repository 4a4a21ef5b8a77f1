"""The generation loop with a stand-in engine: it keeps the engine full, but never claims more work
than the engine's KV cache can hold (the rest stays claimable by other ranks)."""

from typing import List

from spmd_dp.engines import Completion, Request
from spmd_dp.generation import token_demand
from tests.helpers import FakeEngine, run_loop, token_records


def test_engine_kept_full_across_batch_boundaries(tmp_path):
    engine = FakeEngine(32, None)
    sent, stats = run_loop(tmp_path, token_records(200), 8, engine, "generation_options.max_tokens=100")
    assert stats.records == 200 and sorted(b.start for b in sent) == list(range(0, 200, 8))
    assert engine.max_queued >= 32 + 8  # more queued than the engine runs at once


def test_claims_stop_at_the_kv_cache(tmp_path):
    # each request needs 20 prompt + 100 output tokens: a KV cache of 1200 tokens holds 10 of them
    engine = FakeEngine(64, 1200)
    sent, stats = run_loop(tmp_path, token_records(200), 4, engine, "generation_options.max_tokens=100")
    assert stats.records == 200
    assert 10 <= engine.max_queued <= 10 + 4  # one batch past the KV cache, not the 64 + 4 of max_num_seqs
    assert token_demand(Request("0:0", [1] * 20, {"max_tokens": 100, "n": 2})) == 220


class StepEngine(FakeEngine):
    """Runs `capacity` requests at a time; a request takes max_tokens steps. Records how full it ran."""

    def __init__(self, capacity):
        super().__init__(capacity, None)
        self.left = {}
        self.running_per_step: List[int] = []

    def add(self, request):
        self.left[request.request_id] = request.sampling["max_tokens"]
        return super().add(request)

    def step(self):
        running = self.queue[:self.capacity]
        self.running_per_step.append(len(running))
        done = []
        for r in running:
            self.left[r.request_id] -= 1
            if self.left[r.request_id] == 0:
                done.append(r)
        self.queue = [r for r in self.queue if r not in done]
        return [Completion(r.request_id, ["x"], prompt_tokens=1, output_tokens=1) for r in done]


def test_a_long_request_does_not_hold_back_new_claims(tmp_path):
    """Skewed lengths: one long request per batch. Its batch stays open until it ends, but new batches
    are claimed as the short ones finish, so the engine keeps running full."""
    n, bs, capacity = 400, 8, 16
    records = [{"id": i, "prompt": "a b", "generation_options": {"max_tokens": 40 if i % bs == 0 else 2}}
               for i in range(n)]
    engine = StepEngine(capacity)
    sent, stats = run_loop(tmp_path, records, bs, engine)
    assert stats.records == n and sorted(b.start for b in sent) == list(range(0, n, bs))
    busy = engine.running_per_step[: len(engine.running_per_step) * 3 // 4]  # before the tail
    assert sum(busy) / len(busy) > 0.9 * capacity, busy[:50]
