"""Device slices: the seed's GPU layouts, pre-set CUDA_VISIBLE_DEVICES, errors, CPU cores, vLLM ports."""

import os
import subprocess
import sys

import pytest

from spmd_dp.launch.devices import cpu_slice, gpu_slice, plan_device_slice, vllm_port_base, VLLM_PORT_STRIDE
from spmd_dp.errors import UsageError

GPUS8 = tuple(str(i) for i in range(8))


@pytest.mark.parametrize("ranks,g,gpus,expected", [
    (2, 2, GPUS8[:4], [("0", "1"), ("2", "3")]),  # seed: 4 GPUs (2x2)
    (4, 2, GPUS8, [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]),  # seed: 8 GPUs (4x2)
    (2, 4, GPUS8, [("0", "1", "2", "3"), ("4", "5", "6", "7")]),  # seed: 8 GPUs (2x4)
    (4, 1, GPUS8[:4], [("0",), ("1",), ("2",), ("3",)]),
    (1, 2, GPUS8[:2], [("0", "1")]),
    (2, 1, GPUS8, [("0",), ("1",)]),  # fewer ranks than GPUs: the rest stay idle
])
def test_seed_layouts(ranks, g, gpus, expected):
    slices = [gpu_slice(r, ranks, g, gpus) for r in range(ranks)]
    assert [s.ids for s in slices] == expected
    assert all(s.tensor_parallel_size == g for s in slices)
    assert [s.environ()["CUDA_VISIBLE_DEVICES"] for s in slices] == [",".join(e) for e in expected]


NODE8 = [(str(i), f"GPU-{i}aaa-uuid") for i in range(8)]


def test_slices_inside_a_preset_cuda_visible_devices():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    s = plan_device_slice("auto", 1, 2, 2, None, env, NODE8)
    assert s.kind == "cuda" and s.ids == ("6", "7")
    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-0aaa,GPU-1aaa-uuid"}
    assert plan_device_slice("cuda", 1, 2, 1, None, uuids, NODE8).ids == ("GPU-1aaa-uuid",)
    assert plan_device_slice("auto", 3, 4, 2, None, {}, NODE8).ids == ("6", "7")  # all of the node's GPUs


def test_cuda_visible_devices_naming_missing_gpus():
    with pytest.raises(UsageError) as e:
        plan_device_slice("auto", 0, 1, 1, None, {"CUDA_VISIBLE_DEVICES": "2,9"}, NODE8[:4])
    assert str(e.value) == ("environment error: CUDA_VISIBLE_DEVICES=2,9 names GPU 9 but this node has GPUs 0,1,2,3; "
                            "fix CUDA_VISIBLE_DEVICES")
    with pytest.raises(UsageError, match="CUDA_VISIBLE_DEVICES=0 names GPUs but this node has none"):
        plan_device_slice("auto", 0, 1, 1, None, {"CUDA_VISIBLE_DEVICES": "0"}, None)
    cpu = plan_device_slice("cpu", 0, 1, 1, None, {"CUDA_VISIBLE_DEVICES": "0"}, None)  # the way out it names
    assert cpu.kind == "cpu"


@pytest.mark.parametrize("ranks,g,n", [(4, 2, 4), (2, 4, 4), (3, 1, 2), (8, 2, 8)])
def test_too_few_gpus_is_one_clear_error(ranks, g, n):
    with pytest.raises(UsageError) as e:
        gpu_slice(0, ranks, g, GPUS8[:n])
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{ranks} ranks per node" in msg and f"gpus_per_dp_rank={g}" in msg and f"need {ranks * g} GPUs" in msg
    assert f"{n} are visible" in msg and "--nproc-per-node=" in msg


def test_cuda_requested_without_gpus():
    with pytest.raises(UsageError, match="engine_options.device=cuda but no GPU"):
        plan_device_slice("cuda", 0, 1, 1, None, {"CUDA_VISIBLE_DEVICES": ""}, NODE8)
    with pytest.raises(UsageError, match="engine_options.device=cuda but no GPU"):
        plan_device_slice("cuda", 0, 1, 1, None, {}, None)


def test_cpu_slices():
    cores = list(range(8))
    s = [cpu_slice(r, 2, 1, cores) for r in range(2)]
    assert [x.environ()["VLLM_CPU_OMP_THREADS_BIND"] for x in s] == ["0-3", "4-7"]
    assert s[0].environ()["CUDA_VISIBLE_DEVICES"] == ""
    tp = cpu_slice(1, 2, 2, cores)
    assert tp.environ()["VLLM_CPU_OMP_THREADS_BIND"] == "4-5|6-7"
    assert [cpu_slice(r, 2, 1, [0, 1]).ids for r in range(2)] == [("0",), ("1",)]
    # more ranks than cores: shared round-robin, each rank still gets a core
    assert [cpu_slice(r, 4, 1, [0, 1]).ids for r in range(4)] == [("0",), ("1",), ("0",), ("1",)]
    assert cpu_slice(0, 1, 1, [0, 1], cores_per_rank=1).environ()["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    with pytest.raises(UsageError, match="cpu_cores_per_dp_rank=2"):
        cpu_slice(0, 2, 1, [0, 1, 2], cores_per_rank=2)
    with pytest.raises(UsageError, match="gpus_per_dp_rank=2"):
        cpu_slice(0, 2, 2, [0, 1])


def test_a_cpu_slice_pins_the_rank_process_and_its_children():
    core = min(os.sched_getaffinity(0))
    code = (f"import os, subprocess, sys; from spmd_dp.launch.devices import cpu_slice; "
            f"cpu_slice(0, 1, 1, [{core}]).apply(); "
            f"print(os.environ['VLLM_CPU_OMP_THREADS_BIND'], sorted(os.sched_getaffinity(0)), subprocess.run("
            f"[sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, "
            f"text=True).stdout.strip())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out == [str(core), f"[{core}] [{core}]\n"]


def test_vllm_port_ranges_are_disjoint_per_rank():
    bases = [vllm_port_base(29500, r, {}) for r in range(8)]
    ranges = [set(range(b, b + VLLM_PORT_STRIDE)) for b in bases]
    assert all(not (ranges[i] & ranges[j]) for i in range(8) for j in range(i + 1, 8))
    assert 29500 not in set().union(*ranges)
    assert vllm_port_base(29500, 1, {"VLLM_PORT": "40000"}) == 40000 + VLLM_PORT_STRIDE
