"""Starting and switching the shared test Ray (imported by the conftests)."""

from __future__ import annotations

import sys

LOCAL_GPUS = 4


class RayState:
    mode: str | None = None
    cluster = None


def shutdown_ray() -> None:
    if "ray" not in sys.modules:  # never started (e.g. the CUDA checks, on a machine without Ray)
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if RayState.cluster is not None:
        RayState.cluster.shutdown()
        RayState.cluster = None
    RayState.mode = None


def ensure_local_ray():
    import ray

    if RayState.mode != "local" or not ray.is_initialized():
        shutdown_ray()
        ray.init(
            address="local",  # never attach to a cluster someone started with `ray start`
            num_cpus=2,
            num_gpus=LOCAL_GPUS,
            include_dashboard=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
        )
        RayState.mode = "local"
    return ray
