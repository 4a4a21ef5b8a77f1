"""How a rank reaches the others: the one place that chooses between a world of one and gloo.

One rank: a store and a group in this process (spmd_dp/control/local.py), no torch imported. More: the
rendezvous TCPStore and gloo groups of spmd_dp/control/gloo.py, the only torch.distributed user. The rest of
spmd_dp takes the store and the groups from here and sees the same calls either way.
"""

from __future__ import annotations

from datetime import timedelta

from spmd_dp.control.local import LocalGroup, LocalStore
from spmd_dp.plan import RankPlan


def rendezvous(plan: RankPlan, timeout: timedelta):
    """The run's store: in this process for a world of one, else the rendezvous TCPStore (its keys namespaced by
    run and restart: it outlives a torchrun restart)."""
    if plan.world_size == 1:
        return LocalStore(timeout)
    from spmd_dp.control import gloo

    return gloo.rendezvous(plan, timeout)


def substore(store, prefix: str):
    """A namespace inside a store: one per workflow node, and per use inside it."""
    if isinstance(store, LocalStore):
        return store.prefixed(prefix)
    from spmd_dp.control import gloo

    return gloo.substore(store, prefix)


def make_group(store, rank: int, world: int, timeout: timedelta, is_rank0: bool, lazy: bool = False):
    """The world's ranks as one group over `store` (gloo.Group's calls; lazy: see there)."""
    if world == 1:
        return LocalGroup()
    from spmd_dp.control import gloo

    return gloo.Group(store, rank, world, timeout, is_rank0, lazy)
