"""A step's metrics under the names users know from verl (pure: no Ray).

Groups: ``timing_s/*`` (seconds of each part of the step), ``perf/*`` (throughput),
``response_length/*`` and ``prompt_length/*`` (tokens), ``actor/*`` (the policy loss's
figures), ``critic/*`` (rewards, advantages, returns, values, the critic's loss: verl keeps
them there too), ``reward/*`` (each reward function's mean, its named extras and its errors
by reason), ``training/off_policy/*`` (staleness, the training-inference log-prob gap,
partial rollouts), ``dynamic_sampling/*``, ``sync/*`` and ``eval/*``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["length_metrics", "actor_metrics", "tensor_metrics", "reward_metrics", "throughput"]

#: The trainer's figures (``Coordinator.train``) -> their verl-style names.
_ACTOR = {
    "loss": "actor/loss",
    "pg_loss": "actor/pg_loss",
    "kl": "actor/kl",
    "clip_fraction": "actor/clip_frac",
    "clip_fraction_low": "actor/clip_frac_low",
    "clip_fraction_high": "actor/clip_frac_high",
    "ratio_std": "actor/ratio_std",
    "ref_diff": "actor/ref_diff",
    "tis_truncated": "actor/tis_truncated",
    "padding_fraction": "actor/padding_fraction",
    "micro_batches": "actor/micro_batches",
    "ratio_max": "training/off_policy/ratio_max",
    "staleness": "training/off_policy/staleness",
}


def _stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        f"{prefix}/mean": sum(values) / len(values),
        f"{prefix}/max": max(values),
        f"{prefix}/min": min(values),
    }


def length_metrics(completions: Sequence, max_tokens: int) -> dict[str, float]:
    """``response_length/{mean,max,min,clip_ratio}`` and ``prompt_length/{mean,max,min}``.

    ``clip_ratio`` is the share of completions that stopped at ``max_tokens`` (truncated). A
    multi-turn episode's response length counts the tokens the model sampled (its
    observations' are ``agent/observation_tokens``), and it is clipped when its last turn
    stopped at its length limit.
    """
    lengths = [sum(c.loss_mask) if c.loss_mask else len(c.token_ids) for c in completions]
    out = _stats("response_length", lengths)
    clipped = [
        c.finish_reason == "length" if c.loss_mask else n >= max_tokens
        for c, n in zip(completions, lengths, strict=True)
    ]
    out["response_length/clip_ratio"] = sum(clipped) / max(1, len(lengths))
    out.update(_stats("prompt_length", [len(c.prompt_token_ids) for c in completions]))
    return out


def agent_metrics(episodes: Sequence) -> dict[str, float]:
    """Agent episodes: ``agent/<counter>/mean`` per episode, ``agent/<counter>`` summed.

    The counters are ``colocate.agents.STAT_KEYS`` (turns, tool calls, errors, timeouts, each
    kind of truncation, observation and sampled tokens) and the environment's ``info`` keys;
    ``agent/env_reward/mean`` is the environments' reward before its weight.
    """
    n = max(1, len(episodes))
    out = {"agent/env_reward/mean": sum(e.reward for e in episodes) / n}
    keys = sorted({k for e in episodes for k in e.stats})
    for k in keys:
        total = sum(e.stats.get(k, 0.0) for e in episodes)
        out[f"agent/{k}"] = float(total)
        out[f"agent/{k}/mean"] = total / n
    return out


def actor_metrics(stats: Mapping[str, float]) -> dict[str, float]:
    """The trainer's step figures under verl's names (the first log-prob gap included)."""
    out = {name: float(stats[key]) for key, name in _ACTOR.items() if key in stats}
    gap = stats.get("first_logprob_diff", stats.get("logprob_diff"))
    if gap is not None:
        # before the step's first update: the training-inference mismatch alone
        out["training/off_policy/logprob_diff"] = float(gap)
    return out


def tensor_metrics(batch: Mapping, scores: torch.Tensor) -> dict[str, float]:
    """``critic/score/*`` (each completion's reward) and ``critic/advantages/*``.

    Also ``critic/returns/*`` and ``critic/values/*`` where the estimator made them; token
    fields are taken over completion tokens.
    """
    out = _stats("critic/score", [float(s) for s in scores])
    mask = batch["completion_mask"] > 0
    for key in ("advantages", "returns", "values"):
        if key not in batch:
            continue
        value = batch[key].float()
        picked = value[mask] if value.dim() == 2 else value
        if picked.numel():
            out[f"critic/{key}/mean"] = float(picked.mean())
            out[f"critic/{key}/max"] = float(picked.max())
            out[f"critic/{key}/min"] = float(picked.min())
    return out


def reward_metrics(scores, kept: int, dropped: int) -> dict[str, float]:
    """``reward/<fn>/mean``, ``reward/<fn>/<extra>/mean``, ``reward/errors/<fn>/<reason>``.

    Args:
        scores: The reward scorer's :class:`~colocate.runner.rewards.Scores` of the step.
        kept: Completions trained on.
        dropped: Completions dropped (``reward.on_error: drop``).
    """
    out: dict[str, float] = {}
    for name, values in scores.per_function.items():
        if values:
            out[f"reward/{name}/mean"] = sum(values) / len(values)
    for name, values in scores.extra.items():
        present = [v for v in values if v is not None]
        if present:
            out[f"reward/{name}/mean"] = sum(present) / len(present)
    for key, count in scores.errors.items():
        out[f"reward/errors/{key}"] = float(count)
    out["reward/dropped"] = float(dropped)
    out["reward/kept"] = float(kept)
    return out


def throughput(completions: Sequence, seconds: float, gpus: int) -> dict[str, float]:
    """``perf/throughput``: prompt plus completion tokens per second per GPU (verl's)."""
    tokens = sum(len(c.prompt_token_ids) + len(c.token_ids) for c in completions)
    return {
        "perf/total_num_tokens": float(tokens),
        "perf/time_per_step": seconds,
        "perf/throughput": tokens / max(seconds, 1e-9) / max(1, gpus),
    }
