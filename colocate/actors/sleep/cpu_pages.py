"""Sleep on vLLM's CPU build: every worker returns the pages to the OS itself.

vLLM's CPU platform refuses sleep mode: there ``LLM.sleep`` and ``LLM.wake_up`` still pause
scheduling and reset its caches, but free nothing. So after them every worker of the engine
(all TP ranks) runs the worker-extension methods of ``colocate.actors.cpu.cpu_sleep``
(``CpuSleepExtension.cs_release`` / ``cs_acquire``, over ``colocate.actors.cpu.page_release``): the
KV cache's pages go back to the OS (and at level 2 the weights'), and on wake the released
pages are faulted back in before use, as CUDA's wake-up maps its memory back.
"""

from __future__ import annotations

from collections.abc import Callable

from colocate.actors.sleep.strategy import SleepResult, SleepStrategy, SleepTag

__all__ = ["CpuPageRelease", "RELEASED_AT", "sum_release"]

#: What a sleep of each level releases on CPU: level 1 keeps the weights (they already live in
#: host memory, so copying them there would free nothing).
RELEASED_AT: dict[int, frozenset[SleepTag]] = {
    1: frozenset({SleepTag.KV_CACHE}),
    2: frozenset({SleepTag.KV_CACHE, SleepTag.WEIGHTS}),
}

#: The per-worker counts of ``cs_release`` that the engine sums.
_SUMMED = ("kv_bytes", "weight_bytes", "packed_bytes", "kept_bytes")


class CpuPageRelease(SleepStrategy):
    """Page release in every worker, after vLLM's own (non-freeing) sleep and wake calls.

    Args:
        on_workers: The engine's ``(method, *args) -> one result per worker`` call into its
            vLLM workers' extension (``EngineActor._on_workers``).
    """

    def __init__(self, on_workers: Callable[..., list]):
        self._on_workers = on_workers
        self._released: frozenset[SleepTag] = frozenset()  # released and not yet acquired

    def release(self, llm, level: int) -> SleepResult:
        """Sleeps, then releases the pages; the figures are summed over the workers."""
        from colocate.actors.cpu.cpu_sleep import CpuSleepExtension

        llm.sleep(level=level)
        per_worker = self._on_workers(CpuSleepExtension.cs_release, level)
        self._released = RELEASED_AT[level]
        return SleepResult(sum_release(per_worker), weights_dropped=level == 2)

    def acquire(self, llm, tag: SleepTag) -> None:
        """Wakes ``tag``, then faults its pages back in if the last sleep released them."""
        from colocate.actors.cpu.cpu_sleep import CpuSleepExtension

        llm.wake_up(tags=[tag.value])
        if tag in self._released:
            self._on_workers(CpuSleepExtension.cs_acquire, tag.value)
            self._released -= {tag}


def sum_release(per_worker: list[dict]) -> dict[str, int]:
    """The engine's figures from each worker's ``cs_release`` dict.

    Returns:
        ``kv_bytes``, ``weight_bytes``, ``packed_bytes`` and ``kept_bytes`` summed over the
        workers, ``total_bytes`` (KV cache, parameter pages and packed weights) and
        ``workers``.
    """
    total = {k: sum(w[k] for w in per_worker) for k in _SUMMED}
    total["total_bytes"] = total["kv_bytes"] + total["weight_bytes"] + total["packed_bytes"]
    total["workers"] = len(per_worker)
    return total
