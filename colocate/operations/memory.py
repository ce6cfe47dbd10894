"""Memory readings for the timeline: GPU memory on CUDA, process RSS elsewhere, always labelled."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["MemoryReading", "read_memory", "process_stats", "tree_rss", "refresh_children"]


@dataclass(frozen=True)
class MemoryReading:
    """One reading. ``kind`` says what ``used_bytes`` measures, so CPU RSS is never shown as GPU.

    Attributes:
        kind: ``"cuda_reserved"`` (bytes held by this process's CUDA caching allocator) or
            ``"rss"`` (resident set size of this process and its children, e.g. an engine's
            TP worker processes, on CPU machines).
        used_bytes: The reading.
        device_free_bytes: Free memory of the whole device (CUDA only; None on CPU).
        device_total_bytes: Device capacity (CUDA only; None on CPU).
    """

    kind: str
    used_bytes: int
    device_free_bytes: int | None = None
    device_total_bytes: int | None = None


def read_memory() -> MemoryReading:
    """Reads this process's memory: CUDA reserved + device free/total if CUDA, else tree RSS."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            return MemoryReading("cuda_reserved", torch.cuda.memory_reserved(), free, total)
    except Exception:  # noqa: BLE001 - a reading must never break the step it annotates
        pass
    return MemoryReading("rss", tree_rss())


_children: list | None = None  # this process's children, found by refresh_children()


def refresh_children() -> int:
    """Finds this process's child processes again (e.g. once an engine started its workers).

    Listing children scans every process of the machine (milliseconds), so readings use the
    list found here; returns how many there are.
    """
    import psutil

    global _children
    _children = psutil.Process(os.getpid()).children(recursive=True)
    return len(_children)


def tree_rss() -> int:
    """RSS of this process plus the children found by :func:`refresh_children` (if any)."""
    import psutil

    total = psutil.Process(os.getpid()).memory_info().rss
    for child in _children or ():
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited meanwhile
            continue
    return total


def process_stats() -> dict[str, int]:
    """This process's pid, RSS bytes (own, peak, and with children), fds and threads."""
    import resource

    import psutil

    proc = psutil.Process(os.getpid())
    return {
        "pid": proc.pid,
        "rss_bytes": proc.memory_info().rss,
        # the process's high-water mark (Linux reports KiB)
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_tree_bytes": tree_rss(),
        "open_fds": proc.num_fds(),
        "threads": proc.num_threads(),
    }
