"""Intel AMX tile state for a vLLM CPU worker process: asked of Linux before any kernel runs.

Since Linux 5.16 a process must ask for the AMX tile data state (``arch_prctl(
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``) before its first tile instruction; without it
that instruction traps (SIGILL). vLLM 0.32's CPU attention picks its AMX kernel for bf16 on a
CPU whose CPUID reports AMX, but leaves the request to whatever ran before it (oneDNN asks
when it first uses AMX itself). Whether anything did depends on the thread count and on what
ran first: on an AMX build machine (Sapphire Rapids, 2026-12-05) a bf16 engine with
``OMP_NUM_THREADS=1`` died of SIGILL in ``cpu_attention::AttentionMainLoop`` on its first
generate, and ``tests/reliability`` lost an engine that way on clean clones. Asking once per
process, before the engine is built, removes the dependence on order.

The request is idempotent, harmless where it is granted already, and a no-op off x86-64 Linux
or on a CPU without AMX.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

__all__ = ["cpu_has_amx", "request_amx_tiles"]

_SYS_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether this CPU reports AMX tiles (``amx_tile`` in /proc/cpuinfo's flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return any(
        line.startswith("flags") and "amx_tile" in line.split() for line in cpuinfo.splitlines()
    )


def request_amx_tiles() -> bool:
    """Asks Linux for this process's AMX tile state; True when granted (or granted before).

    False off x86-64 Linux, on a CPU without AMX, or when the kernel refuses (then no AMX
    kernel can run in this process, and vLLM's check sees the same CPU flags: the refusal
    is reported by the caller's tests, not hidden).
    """
    if platform.system() != "Linux" or platform.machine() != "x86_64" or not cpu_has_amx():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
