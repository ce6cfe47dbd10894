"""Ready-made losses with the ``loss_fn(model, batch) -> (loss, metrics)`` signature.

Batches are dicts of tensors with one row per sequence (prompt + completion, right-padded):

- ``input_ids`` [B, T] and ``attention_mask`` [B, T];
- ``completion_mask`` [B, T]: 1 where the token is a generated one (its log-prob is trained),
  0 elsewhere: the prompt, padding, and in a multi-turn row the observation tokens between its
  turns. What a per-token field holds where the mask is 0 is never read by these losses (it
  may be anything, even an inf: it is masked out before any exp or square);
- ``sequence_starts`` [B, T]: 1.0 at each row's first completion token (the per-sequence
  :class:`LossAgg` modes count sequences by it; per token, so it survives packing);
- for the policy loss, ``old_logprobs`` [B, T] (the rollout's log-probs at those positions, 0
  elsewhere) and ``advantages`` [B] or [B, T] (``colocate.algorithms.advantages``);
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

from colocate.algorithms.advantages import Estimator, group_advantages
from colocate.algorithms.packing import forward_kwargs

__all__ = [
    "LossAgg",
    "token_logprobs",
    "batch_logprobs",
    "first_tokens",
    "aggregate",
    "clipped_surrogate",
    "policy_loss",
    "grpo_loss",
    "lm_loss",
    "make_batch",
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


def kl_to_reference(
    new: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, the unbiased non-negative "k3" one (GRPO's).

    ``exp(ref - new) - (ref - new) - 1`` of the sampled tokens' log-probs: 0 where they agree.

    Args:
        new: The policy's log-probs.
        ref: The reference's log-probs, same shape.
        mask: Where given, the estimate is 0 (with a zero gradient) wherever ``mask`` is not
            positive, whatever ``ref`` and ``new`` hold there: their difference is dropped
            before the exp, so a large ``ref`` outside the mask cannot make an inf whose
            product with 0 would be NaN.
    """
    d = ref - new
    if mask is not None:
        d = _on(d, mask)
    return torch.exp(d) - d - 1


def _on(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # x where the mask is positive, 0 elsewhere, taken before any nonlinear op: a product with
    # the mask afterwards turns an inf (or its gradient) outside it into NaN.
    return torch.where(mask > 0, x, 0.0)


def first_tokens(mask: torch.Tensor) -> torch.Tensor:
    """``sequence_starts`` of a padded ``[B, T]`` mask: 1.0 at each row's first masked token.

    A row without masked tokens gets none (it counts no sequence). Call it before packing:
    in a packed row the sequences' masks run together.
    """
    m = mask > 0
    return (m & (m.long().cumsum(1) == 1)).float()


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    sequence_starts: torch.Tensor | None = None,
    mode: LossAgg = LossAgg.TOKEN_MEAN,
    norm_tokens: int | None = None,
) -> torch.Tensor:
    """Per-token terms as one number by ``mode`` (verl's ``agg_loss``).

    - ``token-mean``: the sum over the masked tokens / their count;
    - ``seq-mean-token-mean``: the mean over sequences of each sequence's token mean;
    - ``seq-mean-token-sum``: the mean over sequences of each sequence's token sum;
    - ``seq-mean-token-sum-norm``: the sum over the masked tokens / (sequences *
      ``norm_tokens``) (Dr. GRPO: a constant such as the most completion tokens instead of
      each completion's length).

    Sequences are found the same way in padded rows ``[B, T]`` and a packed row ``[1, N]``:
    ``sequence_starts`` marks each sequence's first masked token, so over the flattened tokens
    the running count of starts is each masked token's sequence. A sequence with no masked
    token counts none; an empty batch gives 0. A multi-turn sequence (masked tokens with gaps
    of unmasked ones between its turns) has one start and is one sequence. ``values`` outside
    ``mask`` are never read.

    Args:
        values: Per-token terms ``[B, T]`` or ``[1, N]``.
        mask: 1 on the tokens that count (``completion_mask``), same shape.
        sequence_starts: 1 at each sequence's first masked token, same shape (every mode but
            ``token-mean``).
        mode: A :class:`LossAgg` or its value.
        norm_tokens: The constant of ``seq-mean-token-sum-norm``.

    Raises:
        KeyError: A per-sequence mode without ``sequence_starts`` (with the fix).
        ValueError: ``seq-mean-token-sum-norm`` without a positive ``norm_tokens``, or
            masked tokens before the first sequence start.
    """
    mode = LossAgg(mode)
    mask = mask.float()
    values = _on(values, mask)
    total = (values * mask).sum()
    if mode is LossAgg.TOKEN_MEAN:
        return total / mask.sum().clamp(min=1.0)
    if sequence_starts is None:
        raise KeyError(
            f"loss_agg={mode.value} counts sequences: it needs batch['sequence_starts'] (1.0 at "
            "each row's first completion token); fix: build the batch with make_batch / "
            "make_grpo_batch, or add batch['sequence_starts'] = "
            "first_tokens(batch['completion_mask']) before packing"
        )
    starts = (sequence_starts * mask) > 0
    sequences = starts.sum().float().clamp(min=1.0)
    if mode is LossAgg.SEQ_MEAN_TOKEN_SUM:
        return total / sequences
    if mode is LossAgg.SEQ_MEAN_TOKEN_SUM_NORM:
        if norm_tokens is None or isinstance(norm_tokens, bool) or norm_tokens <= 0:
            raise ValueError(
                f"loss_agg=seq-mean-token-sum-norm with norm_tokens={norm_tokens!r}: divides each "
                "sequence's token sum by a constant; fix: pass norm_tokens > 0 (e.g. the most "
                "completion tokens, rollout.max_tokens)"
            )
        return total / (sequences * norm_tokens)
    flat = mask.reshape(-1)
    # Each masked token's sequence, 1..S; 0 for every token outside the mask.
    segment = starts.reshape(-1).long().cumsum(0) * (flat > 0)
    if bool(((segment == 0) & (flat > 0)).any()):
        raise ValueError(
            "masked tokens before the first sequence start: sequence_starts must be 1 at each "
            "sequence's first completion token (first_tokens(completion_mask))"
        )
    sums = values.new_zeros(segment.numel() + 1).scatter_add(
        0, segment, (values * mask).reshape(-1)
    )
    counts = flat.new_zeros(segment.numel() + 1).scatter_add(0, segment, flat)
    return (sums[1:] / counts[1:].clamp(min=1.0)).sum() / sequences


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    """PPO-clip's per-token objective ``min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)``.

    With ``clip_high`` > ``clip_low`` (DAPO's clip-higher) a token whose probability rises
    under a positive advantage may rise further before it stops counting, which keeps
    low-probability tokens explorable.
    """
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return torch.minimum(ratio * advantages, clipped * advantages)


def policy_loss(
    model,
    batch: dict,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    loss_agg: LossAgg = LossAgg.TOKEN_MEAN,
    tis_cap: float | None = None,
    kl_coef: float = 0.0,
    norm_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy-gradient loss (PPO-clip, GRPO's), optional KL term, by ``loss_agg``.

    ``batch["advantages"]`` is one value per row [B] (grouped estimators) or per token [B, T]
    (REINFORCE++, GAE: ``colocate.algorithms.advantages``). The ratio is clipped to
    ``[1 - clip_low, 1 + clip_high]`` (:func:`clipped_surrogate`; ``clip_high`` None:
    ``clip_low``). The per-token terms become the loss by :func:`aggregate` with ``loss_agg``;
    the per-sequence modes need ``batch["sequence_starts"]`` (:func:`make_batch` adds it) and
    ``seq-mean-token-sum-norm`` needs ``norm_tokens``.

    Micro-batches: the trainer weighs each by its share of the step's ``loss_tokens`` field
    (``TrainerConfig.loss_tokens``). With ``token-mean`` that is ``completion_mask`` (the
    default); with a per-sequence mode pass ``TrainerConfig(loss_tokens="sequence_starts")``,
    so the weighted sum of micro-batch losses is the full batch's loss.

    With ``kl_coef`` > 0 the loss adds ``kl_coef`` times :func:`kl_to_reference` of the
    completion tokens against ``batch["ref_logprobs"]``, aggregated by ``loss_agg`` too;
    metrics then include ``kl`` (its mean over completion tokens, whatever ``loss_agg``) and
    ``ref_diff`` (mean |log pi - log pi_ref|: 0 before the first update when the reference is
    the starting policy).

    Only tokens where ``completion_mask`` is 1 enter the loss, its gradient and the metrics:
    ``old_logprobs``, ``trainer_logprobs``, ``ref_logprobs`` and per-token ``advantages`` are
    dropped elsewhere (a multi-turn row's observation tokens included) before any exp.

    Without ``tis_cap`` the ratio is taken against the rollout's log-probs, so the first update
    of a step is exactly the policy gradient and later ones (if any) stay clipped.

    With ``tis_cap`` (truncated importance sampling): the engine's sampler and the trainer can
    give the same weights different log-probs, so the rollout is slightly off-policy for the
    trainer. The ratio is then taken against the trainer's own log-probs before the update
    (``batch["trainer_logprobs"]`` if given, else the current ones, detached: exact on the
    first optimizer step of a train call) and every token is weighted by
    ``min(pi_trainer / pi_engine, tis_cap)``.

    Metrics (means over completion tokens unless named ``*_max``): ``pg_loss`` (the policy
    term alone, as aggregated); ``logprob_diff``, the mean absolute difference between the
    trainer's log-probs and the engine's (on the first optimizer step, ``first_logprob_diff``
    when a train call takes several: the training-inference mismatch, verl's
    ``rollout_probs_diff``); ``ratio_max`` (the largest ``pi_trainer / pi_engine`` of any
    completion token: a maximum over micro-batches, optimizer steps and ranks,
    ``colocate.algorithms.metrics``) and ``ratio_std`` (its spread); ``clip_fraction`` (the
    ratio outside the clip range), split into ``clip_fraction_low`` (below) and
    ``clip_fraction_high`` (above); ``tis_truncated`` with ``tis_cap``.
    """
    mode = LossAgg(loss_agg)
    clip_high = clip_low if clip_high is None else clip_high
    mask = batch["completion_mask"].float()
    starts = batch.get("sequence_starts")
    ref = batch.get("ref_logprobs")
    if kl_coef and ref is None:
        raise KeyError(
            "policy_loss(kl_coef > 0) needs batch['ref_logprobs']; fix: add the reference "
            "role's log-probs (Coordinator.call_role('reference', ReferenceActor.logprobs, "
            "batch))"
        )
    new = batch_logprobs(model, batch)
    old = batch["old_logprobs"]
    adv = batch["advantages"].float()
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # per row or per token
    # Outside the mask (prompt, padding, a multi-turn row's observations) every input is
    # dropped before the exps, so whatever it holds there adds neither loss nor gradient.
    adv = _on(adv, mask)
    tokens = mask.sum().clamp(min=1.0)
    if tis_cap is None:
        ratio = torch.exp(_on(new - old, mask))
        weight = 1.0
    else:
        behind = batch.get("trainer_logprobs")
        behind = new.detach() if behind is None else behind
        ratio = torch.exp(_on(new - behind, mask))
        weight = torch.exp(_on(behind - old, mask)).clamp(max=tis_cap)
    surrogate = clipped_surrogate(ratio, adv, clip_low, clip_high)
    pg = aggregate(-(surrogate * weight), mask, starts, mode, norm_tokens)
    loss = pg
    if kl_coef:
        loss = loss + kl_coef * aggregate(
            kl_to_reference(new, ref, mask), mask, starts, mode, norm_tokens
        )
    with torch.no_grad():
        # Counts, divided once: the symmetric case's clip_fraction is the former |r - 1| > clip.
        low = ((1 - ratio) > clip_low).float().mul(mask).sum()
        high = ((ratio - 1) > clip_high).float().mul(mask).sum()
        diff = _on(new - old, mask)
        engine_ratio = torch.exp(diff)[mask > 0]
        metrics = {
            "pg_loss": float(pg),
            "clip_fraction": float((low + high) / tokens),
            "clip_fraction_low": float(low / tokens),
            "clip_fraction_high": float(high / tokens),
            "logprob_diff": float(diff.abs().sum() / tokens),
            "ratio_max": float(engine_ratio.max()) if engine_ratio.numel() else 1.0,
            "ratio_std": float(engine_ratio.std()) if engine_ratio.numel() > 1 else 0.0,
        }
        if ref is not None:
            metrics["kl"] = float((kl_to_reference(new, ref, mask) * mask).sum() / tokens)
            metrics["ref_diff"] = float(_on(new - ref, mask).abs().sum() / tokens)
        if tis_cap is not None:
            truncated = (torch.exp(diff) > tis_cap).float().mul(mask).sum() / tokens
            metrics["tis_truncated"] = float(truncated)
    return loss, metrics


def grpo_loss(
    model,
    batch: dict,
    clip: float = 0.2,
    tis_cap: float | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped surrogate with a symmetric ``clip`` and the token-mean aggregation.

    :func:`policy_loss` with ``clip_low = clip_high = clip`` and ``loss_agg=token-mean``:
    ``batch["advantages"]`` per row [B] (GRPO) or per token [B, T] (PPO's GAE, the same
    clipped surrogate being PPO's policy loss); ``tis_cap`` and ``kl_coef`` and the metrics
    are :func:`policy_loss`'s.
    """
    return policy_loss(model, batch, clip_low=clip, tis_cap=tis_cap, kl_coef=kl_coef)


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the tokens where ``completion_mask`` is 1."""
    mask = batch["completion_mask"].float()
    logp = batch_logprobs(model, batch)
    loss = -(_on(logp, mask) * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {}


def make_batch(completions, pad_id: int) -> dict:
    """A padded batch of engine completions, one right-padded row of prompt + completion each.

    Fields: ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on the completion's
    sampled tokens: its ``loss_mask`` where it has one, so a multi-turn episode's observation
    tokens are 0), ``old_logprobs`` (the engine's, where it returned them; 0 elsewhere),
    ``sequence_starts`` (1.0 at each row's first completion token, :func:`first_tokens`) and
    ``weight_version``; no advantages
    (``colocate.algorithms.advantages.estimate`` adds them).

    A completion of no tokens (an engine may stop before the first) makes a row with no
    completion token and no sequence start: it adds no loss term and counts no sequence, in
    every :class:`LossAgg` mode and in the trainer's micro-batch weights.

    Args:
        completions: ``Completion`` objects (prompt-major, a group per prompt when the
            estimator compares completions of one prompt).
        pad_id: Token used for right padding.

    Raises:
        ValueError: No completions.
    """
    if not completions:
        raise ValueError("make_batch(completions=[]): pass at least one completion")
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
        comp[i, p : p + n] = torch.tensor(c.loss_mask, dtype=torch.float32) if c.loss_mask else 1
        if c.logprobs:
            old[i, p : p + n] = torch.tensor(c.logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": comp,
        "old_logprobs": old,
        # Per token, so it survives packing: the per-sequence loss modes count sequences by it.
        "sequence_starts": first_tokens(comp),
        # The weight version that generated each row: the coordinator checks staleness.
        "weight_version": torch.tensor([c.weight_version for c in completions], dtype=torch.long),
    }


def make_grpo_batch(completions, rewards, group_size: int, pad_id: int) -> dict:
    """Builds a GRPO batch from engine completions and their rewards.

    :func:`make_batch` plus ``advantages`` normalised within each group of ``group_size``
    completions of one prompt (mean 0, unit std; a group with identical rewards gets 0:
    ``colocate.algorithms.advantages.group_advantages`` with ``Estimator.GRPO``).

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
    batch = make_batch(completions, pad_id)
    batch["advantages"] = group_advantages(rewards, group_size, Estimator.GRPO)
    return batch
