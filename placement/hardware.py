"""Facts about the hardware behind each bundle, read where the hardware is (on the workers).

The driver of a ``ray job submit`` runs on the head node, often without a GPU: no
device-dependent choice is made from the driver's own devices (only
:func:`local_cuda_devices`, when the driver starts a local Ray on its own machine, counts
them, to give that Ray its GPUs). :func:`probe_accelerator` runs inside the placement
probe on each reserved bundle; the reservation carries its answers, and every device-dependent
choice (actor environments, transports, bucket sizes, config checks) is made from them.
"""

from __future__ import annotations

import enum
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from placement.spec import TopologyError

__all__ = [
    "DeviceKind",
    "Accelerator",
    "probe_accelerator",
    "device_kind_of",
    "local_cuda_devices",
]


class DeviceKind(enum.Enum):
    """What a bundle's "GPU" is: a CUDA device, or a logical GPU on a CPU machine."""

    CUDA = "cuda"
    CPU = "cpu"


@dataclass(frozen=True)
class Accelerator:
    """What one bundle offers, as its own node reports it.

    Attributes:
        kind: CUDA, or CPU (Ray's logical GPUs on a machine without CUDA).
        name: The device's name (``"NVIDIA H200"``), or the CPU's.
        memory_bytes: Device memory on CUDA; the node's host memory on CPU (see
            :attr:`memory_kind`).
        node_address: The node that answered.
        gpu_id: The GPU id Ray assigned to the bundle (a logical id on CPU).
    """

    kind: DeviceKind
    name: str
    memory_bytes: int
    node_address: str = ""
    gpu_id: str = ""

    @property
    def memory_kind(self) -> str:
        """``"device"`` (CUDA memory) or ``"host"`` (RAM of a CPU node): never mixed up."""
        return "device" if self.kind is DeviceKind.CUDA else "host"


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def probe_accelerator(gpu_id: str, node_address: str = "") -> Accelerator:
    """Reads the accelerator of GPU ``gpu_id`` on this node. Runs on the worker.

    ``nvidia-smi`` answers for a CUDA device without creating a CUDA context in this (long-
    lived, reused) probe process. No ``nvidia-smi``, or a GPU id it does not know (Ray's
    logical GPUs on a CPU machine), means the bundle is a CPU one.
    """
    smi = shutil.which("nvidia-smi")
    if smi and gpu_id not in ("", "?"):
        try:
            done = subprocess.run(
                [
                    smi,
                    f"--id={gpu_id}",
                    "--query-gpu=name,memory.total",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0 and "," in done.stdout:
            name, mib = done.stdout.strip().splitlines()[0].rsplit(",", 1)
            return Accelerator(
                DeviceKind.CUDA, name.strip(), int(float(mib)) << 20, node_address, gpu_id
            )
    cpu = platform.processor() or platform.machine() or "cpu"
    return Accelerator(DeviceKind.CPU, cpu, _host_memory_bytes(), node_address, gpu_id)


def device_kind_of(accelerators: Sequence[Accelerator]) -> DeviceKind:
    """The one device kind of a set of bundles.

    Raises:
        TopologyError: Bundles of different kinds (a CPU node in a CUDA job, say): one
            pipeline runs on one kind of device.
    """
    kinds = {a.kind for a in accelerators}
    if len(kinds) != 1:
        where = ", ".join(
            f"bundle {i} on {a.node_address or '?'} is {a.kind.value}"
            for i, a in enumerate(accelerators)
        )
        raise TopologyError(
            f"the reserved bundles mix device kinds ({where or 'no bundles'}); fix: run the "
            "pipeline on nodes of one kind (e.g. give CPU-only nodes no GPU resources)"
        )
    return kinds.pop()


def local_cuda_devices() -> int:
    """CUDA devices of this machine (what a local Ray started here would own; 0 without any).

    For starting a local Ray only: a driver joining a cluster learns nothing from it.
    ``CUDA_VISIBLE_DEVICES``, when set, is what this process may use.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = sum(line.startswith("GPU ") for line in done.stdout.splitlines())
    if visible is not None:
        return min(found, len([v for v in visible.split(",") if v.strip()]))
    return found
