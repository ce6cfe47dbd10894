"""One episode's tokens as the agent loop builds them, and what comes back to the driver.

An episode is one row of the train batch: the prompt, then the model's turns and the
environment's observations, in order. Every token is kept as it was sampled or given (never
decoded and re-encoded); ``loss_mask`` is 1 on the tokens the model sampled and 0 on the
observations', which carry no engine log-prob (0.0).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from colocate.actors.partial_generation import extend_spans
from colocate.core.contract import Completion

__all__ = ["EpisodeStart", "EpisodeResult", "Episode", "Stage", "STAT_KEYS"]

#: The counters every episode reports (summed over a batch by the driver).
STAT_KEYS = (
    "turns",
    "env_steps",
    "tool_errors",
    "tool_timeouts",
    "truncated_turn_tokens",
    "truncated_turns",
    "truncated_context",
    "observation_tokens",
    "sampled_tokens",
)


@dataclass(frozen=True)
class EpisodeStart:
    """An episode to start: sample ``sample`` of prompt group ``group`` on dataset ``row``."""

    group: int
    sample: int
    row: Any


@dataclass(frozen=True)
class EpisodeResult:
    """A finished episode.

    Attributes:
        completion: Its tokens as one :class:`~colocate.core.contract.Completion` (the
            prompt; then turns and observations, with ``loss_mask``).
        reward: The sum of the environment's step rewards.
        stats: Its counters (:data:`STAT_KEYS`) and the environment's ``info`` sums.
        turn_steps: Per turn, the engine steps (counted by the engine's loop) at which it
            was first submitted and at which it finished: how turns of episodes interleave.
    """

    completion: Completion
    reward: float
    stats: dict[str, float]
    turn_steps: tuple[tuple[int, int], ...] = ()


class Stage(enum.Enum):
    """Where an episode is in the loop."""

    READY = "ready"  # its next turn is to be sampled
    SAMPLING = "sampling"  # a turn is in the engine
    STEPPING = "stepping"  # the environment's step runs
    DONE = "done"


@dataclass
class Episode:
    """A live episode (in the engine actor; a paused one waits there for the next rollout).

    Attributes:
        start: Which episode it is.
        env: Its environment.
        prompt_ids: The first observation's tokens.
    """

    start: EpisodeStart
    env: Any
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: tuple[tuple[int, int], ...] = ()
    turn: list[int] = field(default_factory=list)  # the current turn's tokens so far
    stage: Stage = Stage.READY
    reward: float = 0.0
    stats: Counter = field(default_factory=Counter)
    turn_steps: list[list[int]] = field(default_factory=list)
    finish_reason: str | None = None
    future: Any = None
    deadline: float = 0.0
    context_bound: bool = False  # the turn in the engine is cut by max_context, not its budget

    @property
    def key(self) -> tuple[int, int]:
        """(group, sample)."""
        return self.start.group, self.start.sample

    @property
    def context(self) -> list[int]:
        """Every token so far: the next turn's prompt."""
        return [*self.prompt_ids, *self.ids]

    def sampled(self, token_ids, logprobs, version: int) -> None:
        """Appends tokens the model sampled (loss mask 1) under weight ``version``."""
        token_ids = list(token_ids)
        self.ids += token_ids
        self.turn += token_ids
        self.mask += [1] * len(token_ids)
        self.logprobs += list(logprobs) if logprobs else [0.0] * len(token_ids)
        self.spans = extend_spans(self.spans, version, len(token_ids))
        self.stats["sampled_tokens"] += len(token_ids)

    def observed(self, token_ids, version: int) -> None:
        """Appends observation tokens (loss mask 0, no log-prob)."""
        token_ids = list(token_ids)
        self.ids += token_ids
        self.mask += [0] * len(token_ids)
        self.logprobs += [0.0] * len(token_ids)
        self.spans = extend_spans(self.spans, version, len(token_ids))
        self.stats["observation_tokens"] += len(token_ids)

    def result(self, text: str) -> EpisodeResult:
        """The finished episode (``text``: its decoded tokens, for logs only)."""
        sampled_versions = [v for v, _ in self.spans]
        completion = Completion(
            prompt_index=self.start.group,
            sample_index=self.start.sample,
            prompt_token_ids=tuple(self.prompt_ids),
            token_ids=tuple(self.ids),
            logprobs=tuple(self.logprobs),
            text=text,
            finish_reason=self.finish_reason,
            weight_version=min(sampled_versions, default=-1),
            weight_versions=self.spans,
            loss_mask=tuple(self.mask),
        )
        stats = {k: float(self.stats.get(k, 0)) for k in STAT_KEYS}
        stats.update({k: float(v) for k, v in self.stats.items() if k not in stats})
        return EpisodeResult(
            completion, float(self.reward), stats, tuple(tuple(s) for s in self.turn_steps)
        )
