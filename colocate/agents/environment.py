"""What a user's environment implements: ``reset(row)`` and ``step(turn)``.

One environment object serves one episode; the engine actor makes one per episode with the
agent's factory (:class:`colocate.agents.config.AgentConfig`), in its own process, so an
environment may hold state (a sandbox, a game, a conversation) between turns.

Order of an episode: ``reset(row)`` gives the first observation (the prompt); then, until
``done``: the model samples a turn, ``step(turn)`` runs (off the engine's loop, in a worker
thread, under ``AgentConfig.step_timeout_s``) and its observation is appended to the context
with loss mask 0. An observation is text (tokenized by the engine's tokenizer, see
:class:`~colocate.agents.config.ObservationFormat`) or token ids (appended as they are).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Environment", "Turn", "StepResult", "Observation"]

#: Text, or token ids appended exactly as given.
Observation = str | Sequence[int]


@dataclass(frozen=True)
class Turn:
    """One model turn, as the engine sampled it.

    Attributes:
        index: The turn's index in its episode (0 first).
        token_ids: The sampled tokens, exactly (they go to the trainer unchanged).
        text: Their text (decoded for the environment; never re-encoded).
        finish_reason: vLLM's (``"stop"``, or ``"length"`` when the turn hit its token limit).
    """

    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None


@dataclass(frozen=True)
class StepResult:
    """What :meth:`Environment.step` returns.

    Attributes:
        observation: Appended to the context before the next turn (loss mask 0); ignored
            when ``done``. Empty: nothing is appended.
        reward: Added to the episode's reward.
        done: The episode ends here.
        info: Free-form figures, summed per key over the episode (numbers only).
    """

    observation: Observation = ""
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)


class Environment(ABC):
    """One episode's environment (see the module docstring for the order of calls).

    ``step`` may be slow (a tool call, a sandbox): it runs in a worker thread, and a step that
    raises or outlives ``AgentConfig.step_timeout_s`` becomes an error observation for the
    model (counted as ``tool_errors`` / ``tool_timeouts``); the episode goes on. ``step`` may
    also be ``async def``: it then runs on the loop's event loop (many at once on one thread)
    and one that outlives the bound is cancelled, where a synchronous step's thread can only
    be abandoned (it may still be running when the episode's next step starts).
    """

    @abstractmethod
    def reset(self, row: Any) -> Observation:
        """Starts the episode for dataset ``row``; returns the first observation (the prompt)."""

    @abstractmethod
    def step(self, turn: Turn) -> StepResult:
        """Acts on the model's ``turn``; returns the observation, reward and whether it is done."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Called once when the episode ends (or is dropped); frees what the episode held."""
