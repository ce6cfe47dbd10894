"""The interface every sleep mechanism of the engine actor implements.

The engine actor (``colocate.actors.engine``) keeps the memory states, the timeline spans and the
refusal to serve weights no sync has restored; a strategy only moves the memory: ``release``
when the engine sleeps, ``acquire`` for each part it wakes. Both get the engine's
``vllm.LLM``, which the engine alone owns (a strategy never keeps it, so dropping the engine
frees it).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass

__all__ = ["SleepResult", "SleepStrategy", "SleepTag"]


class SleepTag(enum.Enum):
    """A part of the engine's memory that wakes on its own (vLLM's ``wake_up`` tags)."""

    WEIGHTS = "weights"
    KV_CACHE = "kv_cache"


@dataclass(frozen=True)
class SleepResult:
    """What one sleep released, as the engine records it.

    Attributes:
        figures: Bytes released, summed over the engine's workers (``kv_bytes``,
            ``weight_bytes``, ``packed_bytes``, ``kept_bytes``, ``total_bytes``) and the number
            of ``workers``; None where the mechanism counts nothing (vLLM's sleep mode).
        weights_dropped: The weights now read as zeros: the engine must not serve before a
            verified sync rewrote them.
    """

    figures: dict[str, int] | None = None
    weights_dropped: bool = False


class SleepStrategy(abc.ABC):
    """Frees an engine's memory when it sleeps and takes it back when it wakes."""

    @abc.abstractmethod
    def release(self, llm, level: int) -> SleepResult:
        """Puts ``llm`` to sleep and frees its memory.

        Args:
            llm: The engine's ``vllm.LLM``.
            level: 1 (the KV cache; weights kept, on the host where they were on a device) or
                2 (the KV cache and the weights, whose contents are discarded). The engine
                has checked it.

        Returns:
            What was released.
        """

    @abc.abstractmethod
    def acquire(self, llm, tag: SleepTag) -> None:
        """Wakes the memory of ``tag`` in ``llm``; it is resident and usable on return."""
