"""Returning a CPU tensor's pages to the OS while the tensor stays valid.

The CPU analogue of what vLLM's CUDA sleep mode does (unmap the physical memory, keep the
virtual addresses): ``madvise(MADV_DONTNEED)`` over the page-aligned interior of a tensor's
storage drops those pages from the process at once; the addresses stay mapped, every view and
reference stays valid, and the next touch of a page gets a fresh zero page. So a released
tensor reads as zeros (wherever whole pages were released) until it is written again:
only memory whose contents are discarded anyway may be released (a sleeping engine's KV cache;
at level 2 its weights, which a verified sync rewrites before the engine serves).

Only whole pages inside a storage are released: a page the storage shares with another
allocation is left alone, so nothing outside the tensor is ever touched.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable

import torch

__all__ = ["release_pages", "touch", "storages", "trim_heap", "PAGE_SIZE"]

PAGE_SIZE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # <sys/mman.h>; the same value on Linux for every architecture we run on

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only


def storages(tensors: Iterable[torch.Tensor]) -> list[torch.UntypedStorage]:
    """The distinct CPU storages behind ``tensors`` (views of one storage counted once)."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.numel() == 0:
            continue
        s = t.untyped_storage()
        if s.nbytes():
            seen.setdefault(s.data_ptr(), s)
    return list(seen.values())


def _interior(storage: torch.UntypedStorage) -> tuple[int, int]:
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    lo = (start + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    hi = end // PAGE_SIZE * PAGE_SIZE
    return lo, max(0, hi - lo)


def release_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drops the whole pages of every distinct storage behind ``tensors``; returns the bytes.

    Their contents are lost (the pages read as zeros until written). Raises ``OSError`` if the
    kernel refuses (nothing is half-done for that storage: ``madvise`` is all or nothing).
    """
    released = 0
    for s in storages(tensors):
        addr, length = _interior(s)
        if length and _libc.madvise(addr, length, _MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise(MADV_DONTNEED) failed: {os.strerror(err)}")
        released += length
    return released


def trim_heap() -> bool:
    """Returns the C heap's free pages to the OS (glibc ``malloc_trim``); False where absent.

    Memory freed by native code (e.g. a oneDNN matmul handler's packed weight) can stay in
    the allocator's arenas, counted in RSS, until trimmed.
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def touch(tensors: Iterable[torch.Tensor]) -> int:
    """Faults in every page of the storages behind ``tensors`` (writing zeros); returns bytes.

    What re-acquiring released memory means on CPU: the pages are resident again before the
    memory is used, as vLLM's CUDA wake-up maps its physical memory back in one go.
    """
    total = 0
    for s in storages(tensors):
        torch.empty(0, dtype=torch.uint8).set_(s).zero_()
        total += s.nbytes()
    return total
