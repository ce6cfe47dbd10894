"""vLLM's own sleep mode: the platform frees and maps back the memory (CUDA)."""

from __future__ import annotations

from colocate.actors.sleep.strategy import SleepResult, SleepStrategy, SleepTag

__all__ = ["VllmSleepMode"]


class VllmSleepMode(SleepStrategy):
    """``LLM.sleep(level)`` and ``LLM.wake_up(tags)``, nothing else.

    Level 1 frees the KV cache and copies the weights to host memory, level 2 discards both;
    waking maps the memory back (and copies level-1 weights back). Where the platform has no
    sleep mode and is not a CPU (see ``colocate.actors.sleep.factory``), these calls pause and
    resume the engine but free nothing.
    """

    def release(self, llm, level: int) -> SleepResult:
        """Sleeps through vLLM; it reports no byte counts."""
        llm.sleep(level=level)
        # Level 2 discards the weights here too, yet the engine's refusal to serve them before
        # a sync has only ever covered the CPU release; kept as it was (not yet run on a GPU).
        return SleepResult()

    def acquire(self, llm, tag: SleepTag) -> None:
        """Wakes ``tag`` through vLLM."""
        llm.wake_up(tags=[tag.value])
