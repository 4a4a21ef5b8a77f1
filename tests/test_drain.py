"""The drain (spmd_dp/control/drain.py): SIGTERM, SIGUSR1 or a first Ctrl-C start a drain once, a second Ctrl-C
stops at once, a peer's signal drains this rank too and names the rank, the drain's time runs out, a drained run
starts no further workflow node, and a drained rank keeps its handlers. Real signals to this process."""

import os
import signal
import time

import pytest

from spmd_dp.control.drain import Drain
from spmd_dp.errors import Drained


def test_a_peers_signal_drains_once_and_names_the_rank(caplog):
    drain = Drain(0.2)
    assert not drain.requested and not drain.expired()
    drain.request(signal.SIGTERM, "SIGTERM on rank 2")
    drain.request(signal.SIGINT, "SIGINT")  # already draining: the first reason stays
    assert (drain.why, drain.signum) == ("SIGTERM on rank 2", signal.SIGTERM)
    assert "SIGTERM on rank 2: draining: no new batches" in caplog.text and "Ctrl-C again" not in caplog.text
    assert caplog.text.count("draining") == 1
    assert not drain.expired()
    time.sleep(0.3)
    assert drain.expired()  # drain_timeout passed: the requests still in flight are abandoned


def test_a_drained_run_starts_no_further_workflow_node():
    Drain(5.0).stop_before("b")  # no drain: the next node runs
    drain = Drain(5.0)
    drain.request(signal.SIGUSR1, "SIGUSR1")
    drain.stop_before(None)  # the last node: nothing to refuse
    with pytest.raises(Drained, match="stopped by SIGUSR1 before workflow node b; rerun with the same output_dir") as e:
        drain.stop_before("b")
    assert e.value.code == 128 + signal.SIGUSR1  # the exit code says which signal


def test_drain_handler_first_ctrl_c_drains_second_stops():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        drain = Drain(5.0).install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert drain.requested and drain.why == "SIGINT" and drain.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # once draining, a SIGTERM changes nothing
        time.sleep(0.05)
        assert drain.why == "SIGINT"
        drain.restore()  # after a drain the handlers stay: a second SIGTERM must not kill the rank
        assert signal.getsignal(signal.SIGTERM) == drain._handle
        slurm = Drain(5.0).install()  # Slurm's notice
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert slurm.why == "SIGUSR1" and slurm.signum == signal.SIGUSR1 and not slurm.expired()
        quiet = Drain(5.0).install()
        quiet.restore()  # no drain: the previous handlers come back
        assert signal.getsignal(signal.SIGTERM) == slurm._handle
        failing = Drain(5.0).install()
        failing.restore(failing=True)  # a failing rank: torchrun's SIGTERM must not end it before it says why
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) == failing._handle and not failing.requested  # and no drain starts
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
