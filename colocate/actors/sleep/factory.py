"""Which sleep mechanism an engine uses, and building it; the one module that knows them all.

The interface lives in ``colocate.actors.sleep.strategy``; each mechanism in its own module
(``vllm_mode``, ``cpu_pages``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from colocate.actors.sleep.cpu_pages import CpuPageRelease
from colocate.actors.sleep.strategy import SleepStrategy
from colocate.actors.sleep.vllm_mode import VllmSleepMode
from colocate.core.contract import EngineCapabilities
from placement.hardware import DeviceKind

__all__ = ["SleepMechanism", "choose_sleep", "make_sleep_strategy"]


class SleepMechanism(enum.Enum):
    """How an engine's sleep frees its memory."""

    VLLM_SLEEP_MODE = "vllm_sleep_mode"
    CPU_PAGE_RELEASE = "cpu_page_release"


def choose_sleep(caps: EngineCapabilities) -> SleepMechanism:
    """Picks the mechanism from what the engine reported of its platform.

    vLLM's sleep mode wherever the platform has one. On a CPU without it (vLLM's CPU build
    refuses sleep mode) the project's page release. Any other platform without sleep mode
    keeps vLLM's calls, which free nothing there.
    """
    if not caps.sleep_supported and caps.device_type == DeviceKind.CPU.value:
        return SleepMechanism.CPU_PAGE_RELEASE
    return SleepMechanism.VLLM_SLEEP_MODE


def make_sleep_strategy(caps: EngineCapabilities, on_workers: Callable[..., list]) -> SleepStrategy:
    """Builds the strategy :func:`choose_sleep` picks for ``caps``.

    Args:
        caps: The engine's capabilities (``EngineActor.capabilities``).
        on_workers: The engine's call into its workers' extension, ``(method, *args)`` -> one
            result per worker; used by the page release.
    """
    if choose_sleep(caps) is SleepMechanism.CPU_PAGE_RELEASE:
        return CpuPageRelease(on_workers)
    return VllmSleepMode()
