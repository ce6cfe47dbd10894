"""Toy environments on the tiny model: a tool that reveals the rewarded tokens, and a load.

:class:`LookupEnv` is the example and test task of the agent loop: the model's first turn is
a call of the ``lookup`` tool, whose result (an observation: the rewarded token ids, loss mask
0) the model sees before its final turn, which is scored as the toy task scores a completion
(the share of its tokens in the row's ``targets``, ``colocate.testing.toy_task``). Rows are
the toy task's (``write_dataset``). :class:`LatencyEnv` is the benchmark's load: ``turns``
turns, each followed by a tool call of a fixed latency. :class:`PacedEnv` and
:class:`FaultyToolEnv` are test environments: episodes of one run at different paces, and a
tool call that raises or hangs.
"""

from __future__ import annotations

import random
import time

from colocate.agents import Environment, StepResult, Turn

__all__ = ["LookupEnv", "LatencyEnv", "PacedEnv", "FaultyToolEnv"]


class LookupEnv(Environment):
    """Two turns: a ``lookup`` call (its result: the target ids), then the scored answer.

    Args:
        latency_s: The tool's latency.
        reveal: Target ids shown in the observation.
    """

    def __init__(self, latency_s: float = 0.0, reveal: int = 4):
        self.latency_s = latency_s
        self.reveal = reveal

    def reset(self, row: dict) -> str:
        """Keeps the row's targets; the prompt is the row's text."""
        self.targets = sorted(row["targets"])
        return row["prompt"]

    def step(self, turn: Turn) -> StepResult:
        """Turn 0: the lookup (after ``latency_s``); turn 1: the reward, done."""
        if turn.index == 0:
            time.sleep(self.latency_s)
            return StepResult(observation=self.targets[: self.reveal], info={"lookups": 1})
        hits = sum(t in self.targets for t in turn.token_ids)
        return StepResult(reward=hits / max(1, len(turn.token_ids)), done=True)


class LatencyEnv(Environment):
    """``turns`` model turns, each answered by a tool that takes ``latency_s``.

    The observation is ``observation`` (token ids, appended as they are); the reward is 0.

    Args:
        turns: Model turns per episode.
        latency_s: The tool's latency: every call's (``exponential`` False), or the mean of
            an exponential distribution (True), drawn per call from a generator seeded by the
            episode's prompt and the turn's index (the same episode draws the same latencies
            in every run).
        observation: The tool's answer.
        exponential: Draw the latency (as service latencies go: mostly short, a long tail).
    """

    def __init__(
        self,
        turns: int = 4,
        latency_s: float = 0.05,
        observation=(5, 6, 7, 8),
        exponential: bool = False,
    ):
        self.turns = turns
        self.latency_s = latency_s
        self.observation = list(observation)
        self.exponential = exponential

    def reset(self, row) -> str:
        """The row is the prompt."""
        self.prompt = row if isinstance(row, str) else row["prompt"]
        return self.prompt

    def latency(self, turn_index: int) -> float:
        """The tool's latency after turn ``turn_index``."""
        if not self.exponential:
            return self.latency_s
        return random.Random(f"{self.prompt}:{turn_index}").expovariate(1 / self.latency_s)

    def step(self, turn: Turn) -> StepResult:
        """Sleeps the tool's latency, then answers; done after ``turns`` turns."""
        time.sleep(self.latency(turn.index))
        return StepResult(observation=self.observation, done=turn.index + 1 >= self.turns)


class PacedEnv(LatencyEnv):
    """A test environment: :class:`LatencyEnv` whose row sets its own pace.

    The row is a dict: ``prompt``, and optionally ``turns`` and ``latency_s`` (else the
    constructor's), so that episodes of one run differ in length and tool latency.
    """

    def reset(self, row: dict) -> str:
        """Takes the row's ``turns`` and ``latency_s``; the prompt is the row's text."""
        self.turns = row.get("turns", self.turns)
        self.latency_s = row.get("latency_s", self.latency_s)
        return super().reset(row)


class FaultyToolEnv(Environment):
    """A test environment: the first tool call fails, the next turn ends the episode.

    The row is a dict: ``prompt`` and ``fault``: ``"raise"`` (the call raises
    ``RuntimeError``), ``"hang"`` (it sleeps ``hang_s``, past any sane step timeout, then
    answers) or ``"none"`` (it answers ``observation``). The second turn gets reward 1, done.

    Args:
        hang_s: How long a hanging call sleeps.
        observation: The answer of a call that does not fail (token ids).
    """

    def __init__(self, hang_s: float = 30.0, observation=(5, 6, 7, 8)):
        self.hang_s = hang_s
        self.observation = list(observation)

    def reset(self, row: dict) -> str:
        """Keeps the row's fault; the prompt is the row's text."""
        self.fault = row["fault"]
        return row["prompt"]

    def step(self, turn: Turn) -> StepResult:
        """Turn 0: the faulty call; turn 1: reward 1, done."""
        if turn.index > 0:
            return StepResult(reward=1.0, done=True)
        if self.fault == "raise":
            raise RuntimeError("the lookup service is down")
        if self.fault == "hang":
            time.sleep(self.hang_s)
        return StepResult(observation=self.observation)
