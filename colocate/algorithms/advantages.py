"""Advantage estimators (one module): GRPO, Dr. GRPO, RLOO, REINFORCE++ and PPO's GAE.

A step's batch holds ``group_size`` completions of each prompt, prompt-major
(``colocate.algorithms.losses.make_batch``), and one reward per completion. :func:`estimate`
turns the rewards into ``batch["advantages"]`` by one of :class:`Estimator`:

- ``grpo`` (Shao et al. 2024, DeepSeekMath): per row, ``(r_i - mean_g) / (std_g + 1e-6)``
  with the group's population std: a group whose rewards are all equal gets 0.
- ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-Like Training"): per row,
  ``r_i - mean_g``. Dividing by the std weighs questions by how easy or hard they are
  (a group whose rewards barely differ is scaled up); Dr. GRPO drops it, and pairs with the
  ``seq-mean-token-sum-norm`` loss aggregation (no division by each completion's length).
- ``rloo`` (Ahmadian et al. 2024, "Back to Basics"): per row, the leave-one-out baseline
  ``r_i - mean_{j != i} r_j`` (``= g / (g - 1) * (r_i - mean_g)``): the baseline does not
  depend on the completion it is subtracted from, so the estimate is unbiased.
- ``reinforce_pp`` (Hu 2025, REINFORCE++; OpenRLHF's and verl's ``reinforce_plus_plus``):
  per token, the reward ``-kl_coef * (log pi_old - log pi_ref)`` on every completion token
  plus the score on the last (``colocate.algorithms.ppo.token_rewards``), its discounted
  return-to-go ``G_t = r_t + gamma * G_{t+1}`` over the completion, whitened over every
  completion token of the batch: no critic and no groups; the KL penalty is in the reward.
- ``gae`` (Schulman et al. 2016; PPO): per token, generalised advantage estimation against the
  critic's values (``colocate.algorithms.ppo.ppo_advantages``: normalised scores, the same
  per-token rewards, GAE, whitened over completion tokens).

Per-row advantages ``[B]`` broadcast over each row's completion tokens in the loss
(``colocate.algorithms.losses.policy_loss``); per-token ones are ``[B, T]``. Both survive
packing (``colocate.algorithms.packing``). With a grouped estimator ``kl_coef`` is the loss's
KL term, not a reward penalty (:func:`estimate` does not use it).

:func:`informative_groups` is DAPO's dynamic-sampling filter (Yu et al. 2025): a group whose
rewards are all equal carries no signal under a grouped estimator, and is dropped.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from colocate.algorithms.ppo import gae, ppo_advantages, token_rewards, whiten

__all__ = [
    "Estimator",
    "group_advantages",
    "reinforce_pp_advantages",
    "informative_groups",
    "estimate",
    # PPO's, from colocate.algorithms.ppo: the one place that lists every estimator.
    "gae",
    "ppo_advantages",
    "token_rewards",
]


class Estimator(enum.Enum):
    """How a step's rewards become advantages."""

    GRPO = "grpo"
    DR_GRPO = "dr_grpo"
    RLOO = "rloo"
    REINFORCE_PP = "reinforce_pp"
    GAE = "gae"


#: The estimators that compare the completions of one prompt (one advantage per row).
GROUPED = (Estimator.GRPO, Estimator.DR_GRPO, Estimator.RLOO)


def _groups(count: int, group_size: int, what: str) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: must be an int >= 1")
    if count % group_size:
        raise ValueError(
            f"{count} {what} do not form groups of {group_size}; fix: pass group_size "
            "completions of each prompt, prompt-major"
        )
    return count // group_size


def group_advantages(
    rewards: torch.Tensor | Sequence[float], group_size: int, estimator: Estimator
) -> torch.Tensor:
    """One advantage per completion [B] from its group's rewards (see the module docstring).

    Args:
        rewards: One reward per completion [B], prompt-major, ``group_size`` per prompt.
        group_size: Completions per prompt.
        estimator: ``GRPO``, ``DR_GRPO`` or ``RLOO``.

    Raises:
        ValueError: Another estimator (per-token ones need the batch: :func:`estimate`),
            rewards that do not form groups, or RLOO with groups of one.
    """
    estimator = Estimator(estimator)
    if estimator not in GROUPED:
        raise ValueError(
            f"group_advantages(estimator={estimator.value}): only "
            f"{', '.join(e.value for e in GROUPED)} give one advantage per row from its group; "
            "fix: call estimate(), which takes the batch that per-token estimators need"
        )
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 1:
        raise ValueError(f"rewards of shape {tuple(r.shape)}: pass one reward per completion")
    _groups(len(r), group_size, "rewards")
    r = r.view(-1, group_size)
    mean = r.mean(1, keepdim=True)
    if estimator is Estimator.GRPO:
        adv = (r - mean) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)
    elif estimator is Estimator.DR_GRPO:
        adv = r - mean
    else:
        if group_size < 2:
            raise ValueError(
                "rloo with group_size=1: a leave-one-out baseline needs another completion of "
                "the prompt; fix: pass group_size >= 2"
            )
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return adv.view(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Returns-to-go ``G_t = r_t + gamma * G_{t+1}`` over each row's masked tokens [B, T].

    The recursion runs over the masked tokens only: a position outside ``mask`` is skipped,
    the running return carried past it unchanged, and gets 0. In a multi-turn row an earlier
    turn thus gets the later turns' rewards back across the observation tokens between them
    (as if they were not there); a row's prompt gets 0, and a reward outside the mask is
    dropped.
    """
    mask = mask.float()
    out = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros(rewards.shape[0], dtype=torch.float32)
    for t in reversed(range(rewards.shape[1])):
        on = mask[:, t] > 0
        running = torch.where(on, rewards[:, t].float() + gamma * running, running)
        out[:, t] = torch.where(on, running, 0.0)
    return out


def reinforce_pp_advantages(
    batch: dict, scores: torch.Tensor, *, kl_coef: float, gamma: float
) -> dict:
    """``batch`` with REINFORCE++'s token-level ``advantages`` [B, T] and ``returns`` [B, T].

    Steps: per-token rewards (:func:`colocate.algorithms.ppo.token_rewards`: the KL penalty
    ``-kl_coef * (old_logprobs - ref_logprobs)`` on every completion token, the score on the
    last); their discounted returns-to-go over the completion (:func:`discounted_returns`);
    the returns whitened over every completion token of the batch (mean 0, unit population
    std, as PPO's: :func:`colocate.algorithms.ppo.whiten`) are the advantages. Also adds
    ``token_rewards``.

    Needs ``completion_mask`` [B, T], and with ``kl_coef`` > 0 ``old_logprobs`` and
    ``ref_logprobs`` [B, T].
    """
    mask = batch["completion_mask"].float()
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.shape != (mask.shape[0],):
        raise ValueError(
            f"{tuple(scores.shape)} scores for a batch of {mask.shape[0]} rows: pass one per row"
        )
    rewards = token_rewards(batch, scores, kl_coef)
    returns = discounted_returns(rewards, mask, gamma)
    return {
        **batch,
        "advantages": whiten(returns, mask),
        "returns": returns,
        "token_rewards": rewards,
    }


def informative_groups(rewards: Sequence[float], group_size: int) -> list[bool]:
    """DAPO's dynamic-sampling filter: per group, whether its rewards are not all equal.

    A group whose completions all score the same gets advantage 0 from a grouped estimator
    (no gradient but the KL term's), so DAPO drops it and samples more prompts. The test is on
    the raw rewards (the verifier's), not on shaped ones: a length penalty or format bonus
    makes equally right (or wrong) completions differ and would keep groups with no
    correctness signal. Equality is exact: raw rewards are the verifier's discrete values, and
    a spread computed in floating point (``std > 0``) can be nonzero for equal values.

    Args:
        rewards: One raw reward per completion, prompt-major, ``group_size`` per prompt.
        group_size: Completions per prompt.

    Returns:
        One bool per group, in order: False where all its rewards are equal.
    """
    values = [float(r) for r in rewards]
    groups = _groups(len(values), group_size, "rewards")
    out = []
    for g in range(groups):
        group = values[g * group_size : (g + 1) * group_size]
        out.append(any(r != group[0] for r in group))
    return out


def estimate(
    estimator: Estimator,
    batch: dict,
    rewards: torch.Tensor,
    group_size: int,
    *,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> dict:
    """``batch`` with ``advantages`` by ``estimator`` (the module docstring lists them).

    - ``grpo``, ``dr_grpo``, ``rloo``: per-row ``advantages`` [B] (:func:`group_advantages`);
      ``kl_coef``, ``gamma`` and ``lam`` are not used (the KL is the loss's term).
    - ``reinforce_pp``: :func:`reinforce_pp_advantages` (``kl_coef``, ``gamma``).
    - ``gae``: :func:`colocate.algorithms.ppo.ppo_advantages` (``kl_coef``, ``gamma``,
      ``lam``); needs ``batch["values"]`` (the critic's) and, with ``kl_coef`` > 0,
      ``ref_logprobs``.

    Args:
        estimator: An :class:`Estimator` or its value.
        batch: A padded batch (``colocate.algorithms.losses.make_batch``), one row per
            completion, prompt-major.
        rewards: One reward (sequence score) per row [B].
        group_size: Completions per prompt (grouped estimators).
        kl_coef: The per-token KL penalty in the reward (reinforce_pp, gae).
        gamma: Discount (reinforce_pp, gae).
        lam: GAE's lambda.

    Raises:
        ValueError: Rewards that do not match the batch's rows or groups.
        KeyError: A field the estimator needs is missing (the message says which and how).
    """
    estimator = Estimator(estimator)
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    rows = batch["completion_mask"].shape[0]
    if rewards.shape != (rows,):
        raise ValueError(
            f"{tuple(rewards.shape)} rewards for a batch of {rows} rows: pass one per row"
        )
    if estimator in GROUPED:
        return {**batch, "advantages": group_advantages(rewards, group_size, estimator)}
    if estimator is Estimator.REINFORCE_PP:
        return reinforce_pp_advantages(batch, rewards, kl_coef=kl_coef, gamma=gamma)
    if "values" not in batch:
        raise KeyError(
            "estimator gae needs batch['values'] [B, T]; fix: add the critic's values "
            "(Coordinator.call_role('critic', CriticActor.values, batch))"
        )
    return ppo_advantages(batch, rewards, kl_coef=kl_coef, gamma=gamma, lam=lam)
