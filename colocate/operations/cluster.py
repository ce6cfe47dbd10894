"""Joining a Ray cluster, or starting a local one, the way every example and benchmark does.

Order: an explicit address wins, then ``RAY_ADDRESS`` (set by ``ray job submit``); without
either a new local Ray starts (``address="local"``: never attach to a ``ray start`` cluster
that happens to run on the machine) with this machine's CUDA devices, or, on a machine
without any, with logical GPUs (Ray only counts those). Nothing is set in the driver's
environment for the workers: each actor states its own.
"""

from __future__ import annotations

import os

from placement.hardware import local_cuda_devices

__all__ = ["connect"]


def connect(address: str | None = None, logical_gpus: int = 2, **init_kwargs) -> str:
    """Connects this driver to Ray; returns ``"joined"`` or ``"local"``.

    Args:
        address: A cluster to join (default: ``RAY_ADDRESS`` if set, else start a local Ray).
        logical_gpus: GPUs a local Ray announces on a machine without CUDA devices.
        **init_kwargs: Passed to ``ray.init`` (e.g. ``num_cpus``).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **init_kwargs)
        return "joined"
    cuda = local_cuda_devices()
    init_kwargs.setdefault("num_cpus", os.cpu_count() or 2)
    init_kwargs.setdefault("include_dashboard", False)
    ray.init(address="local", num_gpus=cuda or logical_gpus, **init_kwargs)
    return "local"
