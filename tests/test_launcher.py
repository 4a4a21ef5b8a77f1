"""RankEnv: torchrun's, Slurm's or no launcher's environment, parsed once, errors named."""

import pytest

from spmd_dp.launch.launcher import RankEnv, ranks_per_node, scrub_launcher_env
from spmd_dp.errors import UsageError

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
            "MASTER_PORT": "29400", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_RUN_ID": "job7",
            "TORCHELASTIC_USE_AGENT_STORE": "True"}


def test_torchrun_env():
    e = RankEnv.from_environ(TORCHRUN)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (3, 1, 4, 2)
    assert (e.launcher, e.master_addr, e.master_port, e.restart_count, e.agent_store) == ("torchrun", "node0", 29400, 2, True)
    assert e.store_prefix == "spmd_dp/job7/restart2"


def test_no_launcher_is_world_size_one():
    e = RankEnv.from_environ({}, dp_master_port=1234)
    assert (e.rank, e.world_size, e.launcher, e.master_port) == (0, 1, "single", 1234)


def test_half_set_torchrun_env_names_the_missing_variables():
    with pytest.raises(UsageError) as err:
        RankEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2"})
    msg = str(err.value)
    assert "RANK, WORLD_SIZE set but LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT not" in msg


@pytest.mark.parametrize("var,val,match", [("RANK", "x", "RANK='x' is not an integer"),
                                           ("RANK", "4", "not in \\[0, WORLD_SIZE=4\\)"),
                                           ("LOCAL_RANK", "2", "LOCAL_RANK=2, LOCAL_WORLD_SIZE=2")])
def test_bad_values(var, val, match):
    with pytest.raises(UsageError, match=match):
        RankEnv.from_environ({**TORCHRUN, var: val})


def test_slurm_without_torchrun():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "1234",
           "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_RESTART_COUNT": "1"}
    e = RankEnv.from_environ(env)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.launcher) == (5, 1, 8, 4, "slurm")
    assert e.master_addr == "gpu01"  # the first host of the step, by scontrol or by our own expansion
    assert e.master_port == 21234 and e.restart_count == 1


def test_scrub_removes_torchrun_world():
    env = {**TORCHRUN, "GROUP_RANK": "1", "ROLE_NAME": "default", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    scrub_launcher_env(env)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}


@pytest.mark.parametrize("env,g,expected", [
    ({"NPROC_PER_NODE": "5", "SLURM_GPUS_ON_NODE": "8"}, 1, 5),  # given wins
    ({"SLURM_GPUS_ON_NODE": "8"}, 2, 4),                          # what Slurm allocated
    ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0"}, 1, 8),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 1, 4),                  # what is visible
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4, 1),
    ({}, 2, 2),                                                   # nvidia-smi's four GPUs (the stand-in list)
    ({"CUDA_VISIBLE_DEVICES": ""}, 1, 1),                         # GPUs hidden: one rank
    ({"CUDA_VISIBLE_DEVICES": "", "SLURM_NTASKS_PER_NODE": "3(x2)"}, 1, 3),
])
def test_ranks_per_node_one_rule_for_the_launch_scripts(env, g, expected):
    node = [(str(i), f"GPU-{i}") for i in range(4)]
    assert ranks_per_node(env, g, physical=node) == expected


def test_ranks_per_node_refuses_too_few_gpus():
    with pytest.raises(UsageError, match="2 GPUs on the node but engine_options.gpus_per_dp_rank=4"):
        ranks_per_node({"SLURM_GPUS_ON_NODE": "2"}, 4, physical=[])
