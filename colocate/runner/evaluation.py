"""Evaluation during training, through the same engines.

Steps of one evaluation: (1) the eval prompts go to the engines once greedily (temperature
0, one sample) and once with ``eval.k`` samples at ``eval.temperature``, through
``Coordinator.evaluate`` (the ROLLOUT phase: the trainer stays offloaded, the engines serve
the weights of the last sync); (2) the reward functions score every sample off the driver;
(3) per reward function and for the total: the greedy mean, the mean over the k samples, and
pass@k (the share of prompts with at least one of the k samples scoring at least
``eval.pass_threshold``; with exactly k samples the unbiased estimator of Chen et al. 2021
is this share). A reward model is not run here (it would need the SCORE hand-over): its
recipes report the functions' figures only.

With an agent (``agent.env``) the prompts are episodes (``Coordinator.evaluate_episodes``,
each to its end, PARTIAL's paused episodes left alone) and the environment's reward is one
more figure, ``env`` (weighted by ``agent.reward_weight`` into ``reward``, the total).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from colocate.core.config import Sampling
from colocate.runner.rewards import RewardItem
from colocate.runner.schema import EvalSection

__all__ = ["Evaluator", "pass_at_k"]


def pass_at_k(scores: Sequence[float], k: int, threshold: float) -> float:
    """The share of prompts (``k`` consecutive scores each) with a score >= ``threshold``."""
    groups = [scores[i : i + k] for i in range(0, len(scores), k)]
    if not groups:
        return 0.0
    return sum(any(s >= threshold for s in g) for g in groups) / len(groups)


class Evaluator:
    """Evaluates the served policy on the eval split (see the module docstring).

    Args:
        section: The recipe's ``eval`` section.
        data: The eval split (:class:`~colocate.runner.data.PromptData`).
        max_tokens: Tokens per completion (the rollout's).
        decode: Token ids -> completion text (the driver's tokenizer).
    """

    def __init__(
        self, section: EvalSection, data, max_tokens: int, decode, agent=None, env_weight=1.0
    ):
        self.section = section
        self.agent = agent
        self.env_weight = env_weight
        self.data = data
        count = len(data) if section.prompts is None else min(section.prompts, len(data))
        self.rows = list(range(count))
        self.greedy = Sampling(n=1, max_tokens=max_tokens, temperature=0.0)
        self.sampled = Sampling(n=section.k, max_tokens=max_tokens, temperature=section.temperature)
        self.decode = decode

    def due(self, done: int, last: bool) -> bool:
        """Whether to evaluate after ``done`` steps (``last``: the run's final step)."""
        every = self.section.every
        return bool((every and done % every == 0) or (last and self.section.at_end))

    def _score(self, scorer, drawn) -> tuple[dict[str, list[float]], list[float]]:
        episodes = drawn if self.agent is not None else None
        completions = [e.completion for e in drawn] if episodes else drawn
        items = [
            RewardItem(
                self.data.prompt_text[self.rows[c.prompt_index]],
                self.decode(c.token_ids),
                tuple(c.token_ids),
                self.data.rows[self.rows[c.prompt_index]],
            )
            for c in completions
        ]
        scores = scorer.score(items)
        per_fn, total = dict(scores.per_function), list(scores.total)
        if episodes is not None:
            per_fn["env"] = [e.reward for e in episodes]
            total = [t + self.env_weight * e.reward for t, e in zip(total, episodes, strict=True)]
        return per_fn, total

    def _draw(self, coord, prompts: list, sampling: Sampling) -> list:
        if self.agent is None:
            return coord.evaluate(prompts, sampling)
        rows = [self.data.rows[i] for i in self.rows]
        return coord.evaluate_episodes(rows, self.agent, sampling)

    def evaluate(self, coord, scorer, done: int) -> dict[str, float]:
        """One evaluation after ``done`` optimizer steps; returns ``eval/*`` metrics."""
        started = time.time()
        prompts = [self.data.prompt_ids[i] for i in self.rows]
        out: dict[str, float] = {"eval/step": float(done), "eval/prompts": float(len(prompts))}
        k, threshold = self.section.k, self.section.pass_threshold
        greedy = self._draw(coord, prompts, self.greedy)
        per_fn, total = self._score(scorer, greedy)
        for name, values in [*per_fn.items(), ("reward", total)]:
            out[f"eval/{name}/greedy"] = sum(values) / max(1, len(values))
        sampled = self._draw(coord, prompts, self.sampled)
        per_fn, total = self._score(scorer, sampled)
        for name, values in [*per_fn.items(), ("reward", total)]:
            out[f"eval/{name}/mean@{k}"] = sum(values) / max(1, len(values))
            out[f"eval/{name}/pass@{k}"] = pass_at_k(values, k, threshold)
        completions = [e.completion for e in sampled] if self.agent is not None else sampled
        lengths = [sum(c.loss_mask) if c.loss_mask else len(c.token_ids) for c in completions]
        out["eval/response_length/mean"] = sum(lengths) / max(1, len(lengths))
        out["timing_s/eval"] = time.time() - started
        return out
