"""PPO's advantages: per-token rewards (KL penalty plus the sequence score) and GAE.

Batches follow ``colocate.algorithms.losses`` (right-padded rows of prompt + completion). PPO
adds, per row: ``ref_logprobs`` (the reference's), ``values`` (the critic's,
``colocate.roles.critic``) and a sequence score (the reward model's, or a Python reward).
:func:`ppo_advantages` turns them into token-level ``advantages`` (whitened over completion
tokens) and ``returns``; the policy's loss is then :func:`colocate.algorithms.losses.policy_loss`
(PPO-clip, which takes token-level advantages; ``grpo_loss`` is its token-mean form) and the
critic's is :func:`colocate.roles.critic.value_loss`. ``colocate.algorithms.advantages`` lists
every estimator, GAE among them.
"""

from __future__ import annotations

import torch

__all__ = ["token_rewards", "gae", "whiten", "ppo_advantages"]


def token_rewards(batch: dict, scores: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T]: the KL penalty on every token, the score on the last.

    ``-kl_coef * (log pi_old - log pi_ref)`` on every completion token, plus the row's score
    on its last completion token (in a multi-turn row, the last token of its last turn). With
    ``kl_coef`` 0 the batch needs no ``old_logprobs`` or ``ref_logprobs``; whatever they hold
    outside ``completion_mask`` (an observation's tokens, padding) is never read. A row without
    completion tokens gets its score outside the mask (at position 0), where the returns and
    advantages computed from it are 0.
    """
    mask = batch["completion_mask"].float()
    if kl_coef:
        if "ref_logprobs" not in batch:
            raise KeyError(
                f"a KL penalty in the reward (kl_coef={kl_coef}) needs batch['ref_logprobs']; "
                "fix: add the reference role's log-probs (Coordinator.call_role('reference', "
                "ReferenceActor.logprobs, batch)), or pass kl_coef=0"
            )
        diff = batch["old_logprobs"] - batch["ref_logprobs"]
        rewards = -kl_coef * torch.where(mask > 0, diff, 0.0)
    else:
        rewards = torch.zeros_like(mask)
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last = (positions * (mask > 0)).max(dim=1).values  # the last completion token of each row
    rewards[torch.arange(len(last)), last] += scores.float()
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (completion) tokens of each row.

    The recursion runs over each row's masked tokens only, from its last one back: a position
    outside ``mask`` is skipped, the running advantage and the next value carried past it
    unchanged (verl's multi-turn GAE). In a multi-turn row (turns separated by observation
    tokens, mask 0) an earlier turn thus sees the later turns' rewards and values as if the
    observations were not there; in a row of one completion nothing flows into its prompt or
    its padding. Rewards and values outside ``mask`` are never read.

    Returns:
        ``(advantages, returns)`` [B, T], 0 outside ``mask``; ``returns = advantages + values``.
    """
    mask = mask.float()
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0])
    next_value = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(on, delta + gamma * lam * running, running)
        next_value = torch.where(on, values[:, t], next_value)
        adv[:, t] = torch.where(on, running, 0.0)
    return adv, torch.where(mask > 0, adv + values, 0.0)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` brought to mean 0 and unit population std over the tokens of ``mask``; 0 outside.

    One mean and one std over every masked token of the batch (not per row); what ``x`` holds
    outside ``mask`` is never read.
    """
    mask = mask.float()
    x = torch.where(mask > 0, x, 0.0)
    tokens = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / tokens
    std = (((x - mean) * mask) ** 2).sum().div(tokens).sqrt()
    return (x - mean) / (std + 1e-6) * mask


def ppo_advantages(
    batch: dict,
    scores: torch.Tensor,
    *,
    kl_coef: float = 0.05,
    gamma: float = 1.0,
    lam: float = 0.95,
    normalize_scores: bool = True,
) -> dict:
    """``batch`` with PPO's advantages.

    Adds ``advantages`` (whitened over completion tokens), ``returns``, ``old_values`` and
    ``token_rewards``. Needs ``completion_mask`` and ``values`` [B, T], and with ``kl_coef``
    > 0 ``old_logprobs`` and ``ref_logprobs`` [B, T]. With ``normalize_scores`` the batch's
    scores are first brought to mean 0 and unit spread (OpenRLHF's ``--normalize_reward``, per
    batch): a reward model's scale then does not decide how much the KL penalty weighs.
    """
    scores = scores.float()
    if normalize_scores and len(scores) > 1:
        scores = (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-6)
    mask = batch["completion_mask"].float()
    # Outside the mask (observations, prompt, padding) the critic's values are never read.
    values = torch.where(mask > 0, batch["values"].float(), 0.0)
    rewards = token_rewards(batch, scores, kl_coef)
    adv, returns = gae(rewards, values, mask, gamma, lam)
    return {
        **batch,
        "advantages": whiten(adv, mask),
        "returns": returns,
        "old_values": values,
        "token_rewards": rewards,
    }
