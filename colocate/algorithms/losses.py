"""Ready-made losses with the ``loss_fn(model, batch) -> (loss, metrics)`` signature.

Batches are dicts of tensors with one row per sequence (prompt + completion, right-padded):

- ``input_ids`` [B, T] and ``attention_mask`` [B, T];
- ``completion_mask`` [B, T]: 1 where the token is a generated one (its log-prob is trained);
- for GRPO, ``old_logprobs`` [B, T] (the rollout's log-probs at those positions, 0 elsewhere)
  and ``advantages`` [B];
- with a KL term, ``ref_logprobs`` [B, T] (the reference policy's, ``colocate.roles.reference``);
- ``weight_version`` [B]: the weight version that generated each row (staleness checks).

With ``TrainerConfig.max_tokens_per_micro_batch`` a loss is given packed micro-batches instead
(``colocate.algorithms.packing``): every per-token field ``[1, N]``, per-row fields repeated per
token, ``position_ids`` in place of ``attention_mask``. The losses here take either; a loss of
one's own reads the model's outputs through :func:`batch_logprobs` (or passes
``position_ids``) to take either too.
"""

from __future__ import annotations

import enum

import torch

from colocate.algorithms.packing import forward_kwargs

__all__ = [
    "token_logprobs",
    "batch_logprobs",
    "grpo_loss",
    "lm_loss",
    "make_grpo_batch",
    "kl_to_reference",
]


class LossAgg(enum.Enum):
    """How a policy loss's per-token terms become one number (verl's ``loss_agg_mode``)."""

    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-prob of each token given the ones before it; each sequence's first token gets 0.

    Padded rows ``[B, T]`` with ``attention_mask``, or one packed row ``[1, N]`` with
    ``position_ids`` (``colocate.algorithms.packing``: a sequence starts where they are 0).
    """
    logits = model(**forward_kwargs(input_ids, attention_mask, position_ids)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out = torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)
    return out if position_ids is None else out.masked_fill(position_ids == 0, 0.0)


def batch_logprobs(model, batch: dict) -> torch.Tensor:
    """:func:`token_logprobs` of a padded batch or a packed micro-batch."""
    return token_logprobs(
        model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
    )


def kl_to_reference(new: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, the unbiased non-negative "k3" one (GRPO's).

    ``exp(ref - new) - (ref - new) - 1`` of the sampled tokens' log-probs: 0 where they agree.
    """
    d = ref - new
    return torch.exp(d) - d - 1


def grpo_loss(
    model,
    batch: dict,
    clip: float = 0.2,
    tis_cap: float | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped surrogate (PPO-clip with group-normalised advantages), optional KL term.

    ``batch["advantages"]`` is one value per row [B] (GRPO) or per token [B, T] (PPO's GAE,
    ``colocate.algorithms.ppo``): the same clipped surrogate is PPO's policy loss.

    With ``kl_coef`` > 0 the loss adds ``kl_coef`` times the mean :func:`kl_to_reference` of
    the completion tokens against ``batch["ref_logprobs"]``; metrics then include ``kl`` (that
    mean) and ``ref_diff`` (mean |log pi - log pi_ref|: 0 before the first update when the
    reference is the starting policy).

    Without ``tis_cap`` the ratio is taken against the rollout's log-probs, so the first update
    of a step is exactly the policy gradient and later ones (if any) stay clipped.

    With ``tis_cap`` (truncated importance sampling): the engine's sampler and the trainer can
    give the same weights different log-probs, so the rollout is slightly off-policy for the
    trainer. The ratio is then taken against the trainer's own log-probs before the update
    (``batch["trainer_logprobs"]`` if given, else the current ones, detached: exact on the
    first optimizer step of a train call) and every token is weighted by
    ``min(pi_trainer / pi_engine, tis_cap)``.

    Metrics (means over completion tokens unless named ``*_max``): ``logprob_diff``, the mean
    absolute difference between the trainer's log-probs and the engine's (on the first
    optimizer step, ``first_logprob_diff`` when a train call takes several: the
    training-inference mismatch, verl's ``rollout_probs_diff``); ``ratio_max`` (the largest
    ``pi_trainer / pi_engine`` of any completion token: a maximum over micro-batches, optimizer
    steps and ranks, ``colocate.algorithms.metrics``) and ``ratio_std`` (its spread);
    ``clip_fraction``.
    """
    mask = batch["completion_mask"].float()
    new = batch_logprobs(model, batch)
    old = batch["old_logprobs"]
    adv = batch["advantages"].float()
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # per row (GRPO) or per token (PPO)
    tokens = mask.sum().clamp(min=1.0)
    if tis_cap is None:
        ratio = torch.exp((new - old) * mask)
        weight = 1.0
    else:
        ref = batch.get("trainer_logprobs")
        ref = new.detach() if ref is None else ref
        ratio = torch.exp((new - ref) * mask)
        weight = torch.exp((ref - old) * mask).clamp(max=tis_cap)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    loss = -(surrogate * weight * mask).sum() / tokens
    ref = batch.get("ref_logprobs")
    if kl_coef and ref is None:
        raise KeyError(
            "grpo_loss(kl_coef > 0) needs batch['ref_logprobs']; fix: add the reference role's "
            "log-probs (Coordinator.call_role('reference', ReferenceActor.logprobs, batch))"
        )
    kl = (kl_to_reference(new, ref) * mask).sum() / tokens if ref is not None else None
    if kl_coef:
        loss = loss + kl_coef * kl
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip).float().mul(mask).sum() / tokens
        diff = (new - old) * mask
        engine_ratio = torch.exp(diff)[mask > 0]
        metrics = {
            "clip_fraction": float(clipped),
            "logprob_diff": float(diff.abs().sum() / tokens),
            "ratio_max": float(engine_ratio.max()) if engine_ratio.numel() else 1.0,
            "ratio_std": float(engine_ratio.std()) if engine_ratio.numel() > 1 else 0.0,
        }
        if kl is not None:
            metrics["kl"] = float(kl)
            metrics["ref_diff"] = float(((new - ref) * mask).abs().sum() / tokens)
        if tis_cap is not None:
            truncated = (torch.exp(diff) > tis_cap).float().mul(mask).sum() / tokens
            metrics["tis_truncated"] = float(truncated)
    return loss, metrics


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the tokens where ``completion_mask`` is 1."""
    mask = batch["completion_mask"].float()
    logp = batch_logprobs(model, batch)
    loss = -(logp * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {}


def make_grpo_batch(completions, rewards, group_size: int, pad_id: int) -> dict:
    """Builds a GRPO batch from engine completions and their rewards.

    Advantages are normalised within each group of ``group_size`` completions of one prompt
    (mean 0, unit std; a group with identical rewards gets 0).

    Args:
        completions: ``Completion`` objects, prompt-major, ``group_size`` per prompt.
        rewards: One float per completion.
        group_size: Completions per prompt.
        pad_id: Token used for right padding.
    """
    if len(completions) != len(rewards) or len(completions) % group_size:
        raise ValueError(
            f"{len(completions)} completions / {len(rewards)} rewards do not form groups of "
            f"{group_size}"
        )
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)
    rows = [list(c.prompt_token_ids) + list(c.token_ids) for c in completions]
    width = max(len(x) for x in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    comp = torch.zeros((b, width), dtype=torch.float32)
    old = torch.zeros((b, width), dtype=torch.float32)
    for i, (c, ids) in enumerate(zip(completions, rows, strict=True)):
        p, n = len(c.prompt_token_ids), len(c.token_ids)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        comp[i, p : p + n] = 1
        if c.logprobs:
            old[i, p : p + n] = torch.tensor(c.logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": comp,
        "old_logprobs": old,
        "advantages": adv.view(-1),
        # The weight version that generated each row: the coordinator checks staleness.
        "weight_version": torch.tensor([c.weight_version for c in completions], dtype=torch.long),
    }
