"""Memory readings for the timeline: GPU memory on CUDA, process RSS elsewhere, always labelled."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["MemoryReading", "read_memory", "process_stats"]


@dataclass(frozen=True)
class MemoryReading:
    """One reading. ``kind`` says what ``used_bytes`` measures, so CPU RSS is never shown as GPU.

    Attributes:
        kind: ``"cuda_reserved"`` (bytes held by this process's CUDA caching allocator) or
            ``"rss"`` (this process's resident set size, on CPU machines).
        used_bytes: The reading.
        device_free_bytes: Free memory of the whole device (CUDA only; None on CPU).
        device_total_bytes: Device capacity (CUDA only; None on CPU).
    """

    kind: str
    used_bytes: int
    device_free_bytes: int | None = None
    device_total_bytes: int | None = None


def read_memory() -> MemoryReading:
    """Reads this process's memory: CUDA reserved + device free/total if CUDA, else RSS."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            return MemoryReading("cuda_reserved", torch.cuda.memory_reserved(), free, total)
    except Exception:  # noqa: BLE001 - a reading must never break the step it annotates
        pass
    import psutil

    return MemoryReading("rss", psutil.Process(os.getpid()).memory_info().rss)


def process_stats() -> dict[str, int]:
    """This process's pid, RSS bytes, open file descriptors and threads (for soak checks)."""
    import psutil

    proc = psutil.Process(os.getpid())
    return {
        "pid": proc.pid,
        "rss_bytes": proc.memory_info().rss,
        "open_fds": proc.num_fds(),
        "threads": proc.num_threads(),
    }
