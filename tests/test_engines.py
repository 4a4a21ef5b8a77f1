"""Building a rank's engine (spmd_dp/engines/__init__.py): the echo engine with no vLLM import, and several engines
on one rank (`TaskEngines`, one per task) that route each request to its task's engine and step only those that
hold requests (vLLM's step blocks when it has none)."""

import subprocess
import sys

from spmd_dp.config import load_config
from spmd_dp.engines import TaskEngines, build_engine
from spmd_dp.engines.base import Request
from spmd_dp.engines.echo import EchoEngine
from spmd_dp.launch.devices import DeviceSlice
from spmd_dp.testing import REPO


class Counting(EchoEngine):
    def __init__(self, *a):
        super().__init__(*a)
        self.steps = 0

    def step(self):
        self.steps += 1
        return super().step()


def test_the_echo_engine_is_built_without_vllm():
    code = ("import sys; from spmd_dp.config import load_config; from spmd_dp.engines import build_engine; "
            "from spmd_dp.launch.devices import DeviceSlice; "
            "e = build_engine(load_config(['inference_engine=echo', 'batch_size=6']), DeviceSlice('cpu', (), 1), 0); "
            "print(type(e).__name__, e.capacity, 'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["EchoEngine", "6", "False"]
    cfg = load_config(["inference_engine=echo", "engine_options.echo_fault_ranks=[0]"])
    assert build_engine(cfg, DeviceSlice("cpu", (), 1), 0).fault == "die"
    assert build_engine(cfg, DeviceSlice("cpu", (), 1), 0, attempt=1).fault is None  # a restart: its attempt


def test_task_engines_route_requests_and_step_only_busy_engines():
    opts = load_config(["engine_options.max_num_seqs=3", "engine_options.max_model_len=50"]).engine_options
    gen, emb = Counting(opts, 4, 0), Counting(opts, 4, 0)
    both = TaskEngines({"generate": gen, "embed": emb, "classify": emb})
    assert both.capacity == 6 and both.kv_tokens is None and len(both.engines) == 2
    assert both.add(Request("a", "x y", {"max_tokens": 1})) is None
    assert both.add(Request("b", "x y", {}, task="classify")) is None
    refused = both.add(Request("c", " ".join(["w"] * 60), {"max_tokens": 1}))  # too long: refused at once
    assert refused.error and both.pending == [1, 1]
    done = both.step()
    assert sorted(c.request_id for c in done) == ["a", "b"] and both.pending == [0, 0]
    assert done[0].texts == ["x"] and done[1].value == [1.0, 0.0]
    assert both.step() == [] and (gen.steps, emb.steps) == (1, 1)  # nothing pending: neither engine stepped
    both.close()
    assert gen.closed.is_set() and emb.closed.is_set()
