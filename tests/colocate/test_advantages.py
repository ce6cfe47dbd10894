"""Advantage estimators, DAPO's group filter, loss aggregation and clip-higher (no Ray).

Each estimator and aggregation mode is checked against a plain loop written here on fixed
numbers; the policy loss end to end on a tiny Llama built in the test: padded rows equal a
packed row, and micro-batches weighted by their share of the trainer's ``loss_tokens`` field
(completion tokens for token-mean, sequences for the per-sequence modes) add up to the full
batch's loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from colocate.algorithms.advantages import (
    Estimator,
    estimate,
    group_advantages,
    informative_groups,
    reinforce_pp_advantages,
)
from colocate.algorithms.batches import counted_packed_parts, slice_rows, weigh_parts
from colocate.algorithms.losses import (
    LossAgg,
    aggregate,
    batch_logprobs,
    clipped_surrogate,
    first_tokens,
    grpo_loss,
    make_batch,
    make_grpo_batch,
    policy_loss,
)
from colocate.algorithms.micro_batches import plan_token_step
from colocate.algorithms.packing import PackedModel, pack, sequence_lengths
from colocate.core.contract import Completion

pytestmark = pytest.mark.fast

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.2, 0.9, 0.4, 0.0]
GROUP = 4
NORM = 8  # seq-mean-token-sum-norm's constant


# ----- grouped estimators -------------------------------------------------------------------


def _loop_grouped(rewards, group_size, kind):
    """One advantage per completion, group by group, as the papers write them."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / len(group))
        for i, r in enumerate(group):
            if kind == "grpo":
                out.append((r - mean) / (std + 1e-6))
            elif kind == "dr_grpo":
                out.append(r - mean)
            else:  # rloo: the mean of the other completions of the prompt
                others = [x for j, x in enumerate(group) if j != i]
                out.append(r - sum(others) / len(others))
    return out


@pytest.mark.parametrize("estimator", [Estimator.GRPO, Estimator.DR_GRPO, Estimator.RLOO])
def test_grouped_estimators_match_the_textbook_loop(estimator):
    got = group_advantages(torch.tensor(REWARDS), GROUP, estimator)
    want = torch.tensor(_loop_grouped(REWARDS, GROUP, estimator.value))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got[4:8].abs().sum() == 0  # a group of equal rewards: no advantage


def test_grpo_advantages_are_make_grpo_batchs():
    completions = _completions([3, 1, 4, 2])
    batch = make_grpo_batch(completions, [1.0, 0.0, 0.3, 0.3], 2, pad_id=0)
    assert torch.equal(batch["advantages"], group_advantages([1.0, 0.0, 0.3, 0.3], 2, "grpo"))
    plain = make_batch(completions, pad_id=0)
    assert "advantages" not in plain
    assert all(torch.equal(plain[k], batch[k]) for k in plain)


def test_group_advantages_refuse_other_estimators_and_ragged_groups():
    with pytest.raises(ValueError, match="fix: call estimate"):
        group_advantages(torch.tensor(REWARDS), GROUP, Estimator.REINFORCE_PP)
    with pytest.raises(ValueError, match="do not form groups of 5"):
        group_advantages(torch.tensor(REWARDS), 5, Estimator.GRPO)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.tensor(REWARDS), 1, Estimator.RLOO)


def test_informative_groups_drop_groups_of_equal_raw_rewards():
    rewards = [1, 0, 0, 1] + [0.5] * 4 + [0.0] * 4 + [1, 1, 1, 0.999] + [0.1] * 4
    assert informative_groups(rewards, 4) == [True, False, False, True, False]
    with pytest.raises(ValueError, match="do not form groups of 3"):
        informative_groups([1.0, 0.0], 3)


# ----- per-token estimators -----------------------------------------------------------------


def _token_batch():
    """Rows of prompt, completion, padding; the last row's completion is empty."""
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    gen = torch.Generator().manual_seed(0)
    old = (torch.rand(mask.shape, generator=gen) * -3) * mask
    ref = (torch.rand(mask.shape, generator=gen) * -3) * mask
    values = torch.randn(mask.shape, generator=gen)
    batch = {"completion_mask": mask, "old_logprobs": old, "ref_logprobs": ref, "values": values}
    return batch, torch.tensor([1.0, -0.5, 2.0, 0.7])


def _loop_token_rewards(batch, scores, kl_coef):
    """Per row: {position: reward} over its completion tokens."""
    out = []
    for i in range(len(scores)):
        tokens = [
            t for t in range(batch["completion_mask"].shape[1]) if batch["completion_mask"][i, t]
        ]
        r = {
            t: -kl_coef * float(batch["old_logprobs"][i, t] - batch["ref_logprobs"][i, t])
            for t in tokens
        }
        if tokens:
            r[tokens[-1]] += float(scores[i])
        out.append(r)
    return out


def _loop_whiten(per_row):
    flat = [x for row in per_row for x in row.values()]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
    return [{t: (x - mean) / (std + 1e-6) for t, x in row.items()} for row in per_row]


def _dense(per_row, shape):
    out = torch.zeros(shape)
    for i, row in enumerate(per_row):
        for t, x in row.items():
            out[i, t] = x
    return out


def test_reinforce_pp_matches_the_textbook_loop():
    batch, scores = _token_batch()
    gamma, kl_coef = 0.9, 0.1
    returns = []
    for row in _loop_token_rewards(batch, scores, kl_coef):
        g, ret = 0.0, {}
        for t in sorted(row, reverse=True):
            g = row[t] + gamma * g
            ret[t] = g
        returns.append(ret)
    out = reinforce_pp_advantages(batch, scores, kl_coef=kl_coef, gamma=gamma)
    shape = batch["completion_mask"].shape
    torch.testing.assert_close(out["returns"], _dense(returns, shape), rtol=0, atol=1e-5)
    want = _dense(_loop_whiten(returns), shape)
    torch.testing.assert_close(out["advantages"], want, rtol=0, atol=1e-5)
    assert out["advantages"][3].abs().sum() == 0  # the empty completion


def test_reinforce_pp_without_kl_needs_no_reference():
    batch, scores = _token_batch()
    bare = {"completion_mask": batch["completion_mask"]}
    out = estimate(Estimator.REINFORCE_PP, bare, scores, 1, gamma=0.5)
    # The score alone, discounted back from the last completion token.
    assert out["returns"][0, 2:6].tolist() == pytest.approx([0.125, 0.25, 0.5, 1.0])
    with pytest.raises(KeyError, match="ref_logprobs"):
        estimate(Estimator.REINFORCE_PP, bare, scores, 1, kl_coef=0.1)


def test_gae_matches_the_textbook_recursion():
    batch, scores = _token_batch()
    gamma, lam, kl_coef = 0.9, 0.8, 0.05
    mean = sum(scores.tolist()) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores.tolist()) / len(scores))
    normalised = [(s - mean) / (std + 1e-6) for s in scores.tolist()]
    adv, ret = [], []
    for i, row in enumerate(_loop_token_rewards(batch, normalised, kl_coef)):
        tokens = sorted(row)
        a, r, running = {}, {}, 0.0
        for k in reversed(range(len(tokens))):
            t = tokens[k]
            value = float(batch["values"][i, t])
            next_value = float(batch["values"][i, tokens[k + 1]]) if k + 1 < len(tokens) else 0.0
            running = row[t] + gamma * next_value - value + gamma * lam * running
            a[t], r[t] = running, running + value
        adv.append(a)
        ret.append(r)
    out = estimate(Estimator.GAE, batch, scores, 1, kl_coef=kl_coef, gamma=gamma, lam=lam)
    shape = batch["completion_mask"].shape
    torch.testing.assert_close(out["returns"], _dense(ret, shape), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out["advantages"], _dense(_loop_whiten(adv), shape), atol=1e-5, rtol=0
    )


def test_estimate_dispatches_and_refuses():
    batch, _ = _token_batch()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    out = estimate("rloo", batch, rewards, 2)
    assert torch.equal(out["advantages"], group_advantages(rewards, 2, Estimator.RLOO))
    with pytest.raises(ValueError, match="pass one per row"):
        estimate(Estimator.GRPO, batch, rewards[:3], 1)
    with pytest.raises(KeyError, match="critic's values"):
        estimate(Estimator.GAE, {k: v for k, v in batch.items() if k != "values"}, rewards, 1)


# ----- aggregation --------------------------------------------------------------------------


def _loop_aggregate(values, mask, mode):
    """``values`` [B, T] as one number, one row per sequence, plain loops."""
    seqs = []
    for i in range(mask.shape[0]):
        terms = [float(values[i, t]) for t in range(mask.shape[1]) if mask[i, t]]
        if terms:  # a row without completion tokens is no sequence
            seqs.append(terms)
    if mode is LossAgg.TOKEN_MEAN:
        return sum(sum(s) for s in seqs) / sum(len(s) for s in seqs)
    if mode is LossAgg.SEQ_MEAN_TOKEN_MEAN:
        return sum(sum(s) / len(s) for s in seqs) / len(seqs)
    if mode is LossAgg.SEQ_MEAN_TOKEN_SUM:
        return sum(sum(s) for s in seqs) / len(seqs)
    return sum(sum(s) for s in seqs) / (len(seqs) * NORM)


@pytest.mark.parametrize("mode", list(LossAgg))
def test_aggregate_matches_loops_padded_and_packed(mode):
    batch, _ = _token_batch()
    mask = batch["completion_mask"]
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    want = _loop_aggregate(values, mask, mode)
    starts = first_tokens(mask)
    got = aggregate(values, mask, starts, mode, NORM)
    assert float(got) == pytest.approx(want, abs=1e-6)

    attention = torch.ones_like(mask, dtype=torch.long)
    padded = {"attention_mask": attention, "v": values, "m": mask, "s": starts}
    packed = pack(padded, [2, 0, 3, 1])  # sequences back to back, in another order
    assert packed["v"].shape == (1, mask.numel())
    got = aggregate(packed["v"], packed["m"], packed["s"], mode.value, NORM)
    assert float(got) == pytest.approx(want, abs=1e-6)


def test_aggregate_names_what_is_missing():
    batch, _ = _token_batch()
    mask = batch["completion_mask"]
    with pytest.raises(KeyError, match="fix: build the batch with make_batch"):
        aggregate(mask, mask, None, LossAgg.SEQ_MEAN_TOKEN_MEAN)
    with pytest.raises(ValueError, match="norm_tokens > 0"):
        aggregate(mask, mask, first_tokens(mask), LossAgg.SEQ_MEAN_TOKEN_SUM_NORM)
    assert float(aggregate(mask, mask, None, LossAgg.TOKEN_MEAN)) == 1.0


def test_clip_higher_lets_a_rising_token_rise_further():
    ratio = torch.tensor([1.25, 0.75], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    surrogate = clipped_surrogate(ratio, adv, clip_low=0.2, clip_high=0.28)
    # 1.25 < 1 + 0.28: not clipped; 0.75 < 1 - 0.2 with a negative advantage: clipped.
    assert surrogate.tolist() == pytest.approx([1.25, -0.8])
    surrogate.sum().backward()
    assert ratio.grad.tolist() == [1.0, 0.0]
    symmetric = clipped_surrogate(ratio.detach(), adv, clip_low=0.2, clip_high=0.2)
    assert symmetric.tolist() == pytest.approx([1.2, -0.8])


# ----- the policy loss end to end -----------------------------------------------------------


def _completions(lengths):
    out = []
    for i, n in enumerate(lengths):
        prompt = tuple(1 + (7 * i + k) % 60 for k in range(1 + i % 3))
        tokens = tuple(1 + (11 * i + 3 * k) % 60 for k in range(n))
        logprobs = tuple(-3.0 - 0.1 * k for k in range(n))
        out.append(Completion(i // 2, i % 2, prompt, tokens, logprobs, "", "stop", 0))
    return out


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def batch(model):
    """Eight completions of 1-9 tokens, one empty, RLOO advantages, a reference."""
    b = make_batch(_completions([5, 9, 1, 0, 7, 3, 8, 2]), pad_id=0)
    with torch.no_grad():
        new = batch_logprobs(model, b)
    mask = b["completion_mask"]
    noise = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)) * 0.3
    b["old_logprobs"] = (new + noise) * mask  # ratios around 1, some clipped
    b["ref_logprobs"] = (new - noise.abs()) * mask
    b["advantages"] = group_advantages([1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 1.0], 2, "rloo")
    return b


def _loss(model, batch, mode):
    loss, _ = policy_loss(
        model, batch, clip_high=0.28, loss_agg=mode, kl_coef=0.1, norm_tokens=NORM
    )
    return float(loss.detach())


def test_make_batch_marks_each_sequence_once(batch):
    starts, mask = batch["sequence_starts"], batch["completion_mask"]
    assert starts.sum(1).tolist() == [1, 1, 1, 0, 1, 1, 1, 1]  # the empty completion: none
    assert bool((starts <= mask).all())


@pytest.mark.parametrize("mode", list(LossAgg))
def test_policy_loss_packed_equals_padded(model, batch, mode):
    packed = pack(batch, [3, 1, 0, 7, 2, 6, 4, 5])
    gap = abs(_loss(PackedModel(model), packed, mode) - _loss(model, batch, mode))
    assert gap <= 1e-5


def _weight_field(mode):
    return "completion_mask" if mode is LossAgg.TOKEN_MEAN else "sequence_starts"


@pytest.mark.parametrize("mode", list(LossAgg))
def test_weighted_micro_batches_add_up_to_the_full_batch(model, batch, mode):
    full = _loss(model, batch, mode)
    field = _weight_field(mode)
    total = float(batch[field].sum())
    parts = [slice_rows(batch, 0, 2), slice_rows(batch, 2, 8)]  # unequal rows and tokens
    summed = sum(_loss(model, p, mode) * float(p[field].sum()) / total for p in parts)
    assert abs(summed - full) <= 1e-5

    # The trainer's packed path: budgeted micro-batches weighted by loss_tokens=field.
    lengths = sequence_lengths(batch)
    (step,) = plan_token_step(lengths, budget=16)
    assert len(step) > 1
    micro = weigh_parts(counted_packed_parts(batch, step, field, lengths))
    summed = sum(_loss(PackedModel(model), part, mode) * w for part, w in micro)
    assert abs(summed - full) <= 1e-5


def test_per_sequence_modes_need_sequence_weights(model, batch):
    """The check above is not vacuous: token weights do not add up a per-sequence mean."""
    mode = LossAgg.SEQ_MEAN_TOKEN_MEAN
    total = float(batch["completion_mask"].sum())
    parts = [slice_rows(batch, 0, 2), slice_rows(batch, 2, 8)]
    summed = sum(_loss(model, p, mode) * float(p["completion_mask"].sum()) / total for p in parts)
    assert abs(summed - _loss(model, batch, mode)) > 1e-3


def test_grpo_loss_is_policy_losss_token_mean(model, batch):
    for kwargs in ({}, {"kl_coef": 0.1, "tis_cap": 2.0}):
        loss, metrics = grpo_loss(model, batch, clip=0.1, **kwargs)
        same, same_metrics = policy_loss(model, batch, clip_low=0.1, **kwargs)
        assert float(loss.detach()) == float(same.detach()) and metrics == same_metrics
        assert metrics["clip_fraction"] == pytest.approx(
            metrics["clip_fraction_low"] + metrics["clip_fraction_high"]
        )
    with pytest.raises(KeyError, match="sequence_starts"):
        no_starts = {k: v for k, v in batch.items() if k != "sequence_starts"}
        policy_loss(model, no_starts, loss_agg=LossAgg.SEQ_MEAN_TOKEN_SUM)


@pytest.mark.parametrize(
    ("ratio", "advantage", "clip_high", "pg_loss", "low", "high"),
    [
        (1.25, 1.0, 0.28, -1.25, 0.0, 0.0),  # clip-higher: not clipped
        (1.25, 1.0, None, -1.2, 0.0, 1.0),  # symmetric 0.2: clipped
        (0.75, -1.0, 0.28, 0.8, 1.0, 0.0),  # below 1 - clip_low with a negative advantage
    ],
)
def test_clip_higher_end_to_end(model, batch, ratio, advantage, clip_high, pg_loss, low, high):
    with torch.no_grad():
        new = batch_logprobs(model, batch)
    mask = batch["completion_mask"]
    rows = mask.shape[0]
    b = {
        **batch,
        "old_logprobs": (new - math.log(ratio)) * mask,
        "advantages": torch.full((rows,), advantage),
    }
    _, metrics = policy_loss(model, b, clip_low=0.2, clip_high=clip_high)
    assert metrics["pg_loss"] == pytest.approx(pg_loss, abs=1e-5)
    assert metrics["clip_fraction_low"] == low and metrics["clip_fraction_high"] == high
