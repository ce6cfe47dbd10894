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
        )
        RayState.mode = "local"
    return ray


def fake_cuda_probe(name: str = "NVIDIA H200 (simulated)", memory_bytes: int = 141 << 30):
    """A placement probe that reports CUDA bundles: the real node and GPU id, a faked device.

    Only the probe's answer is faked: everything downstream (reservation, fleet environments,
    transports, bucket sizes) runs as it would on a CUDA cluster.
    """
    import ray

    from placement.hardware import Accelerator, DeviceKind

    @ray.remote(num_cpus=0.01, num_gpus=0.01, max_calls=0)
    def probe():
        ctx = ray.get_runtime_context()
        gpus = ray.get_gpu_ids()
        gpu = str(gpus[0]) if gpus else "?"
        address = ray.util.get_node_ip_address()
        return (
            ctx.get_node_id(),
            address,
            gpu,
            Accelerator(DeviceKind.CUDA, name, memory_bytes, address, gpu),
        )

    return probe
