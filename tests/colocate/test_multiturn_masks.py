"""Multi-turn rows: a ``completion_mask`` with gaps (no Ray).

A multi-turn episode is one row: prompt, the model's first turn, the environment's
observation tokens (mask 0, no engine log-prob), the model's second turn, ... then padding.
Built here by hand on a tiny Llama (and its value-head twin for the critic's loss), checked:

- whatever the per-token fields hold outside the mask (observations, prompt, padding; large
  finite values and infs) changes neither the policy loss (every aggregation mode, with and
  without TIS and a KL term), GRPO's loss, the critic's value loss, nor any parameter
  gradient, bit for bit, nor PPO's advantages and returns; the same fields changed on a
  turn's tokens do change them (each check can fail);
- GAE and REINFORCE++'s returns skip the gaps: a turn's advantages are those of the row with
  its observation tokens deleted, and rows without gaps get what the former recursion (which
  restarted at every mask-0 position) gave, bit for bit;
- ``first_tokens`` marks one start per multi-turn row, a gapped row is one sequence to the
  per-sequence modes, and packing keeps the gapped mask exactly and the loss of the padded
  batch.
"""

from __future__ import annotations

import pytest
import torch

from colocate.algorithms.advantages import discounted_returns, group_advantages
from colocate.algorithms.batches import counted_packed_parts, weigh_parts
from colocate.algorithms.losses import (
    LossAgg,
    aggregate,
    batch_logprobs,
    first_tokens,
    grpo_loss,
    kl_to_reference,
    policy_loss,
)
from colocate.algorithms.micro_batches import plan_token_step
from colocate.algorithms.packing import PackedModel, pack, sequence_lengths, unpack
from colocate.algorithms.ppo import gae, ppo_advantages
from colocate.roles.critic import value_loss

pytestmark = pytest.mark.fast

VOCAB = 64
NORM = 16
#: Each row as (kind, tokens) segments: p prompt, a a model turn, o an observation.
ROWS = [
    [("p", 3), ("a", 4), ("o", 3), ("a", 5)],
    [("p", 2), ("a", 2), ("o", 4), ("a", 3), ("o", 2), ("a", 2)],
    [("p", 4), ("a", 6)],  # one turn
    [("p", 2), ("a", 3), ("o", 2), ("a", 1)],
    [("p", 3), ("a", 1), ("o", 1), ("a", 4)],
    [("p", 2), ("a", 0)],  # an empty completion
]
#: The fields whose values outside the mask must not matter.
LOGPROB_FIELDS = ("old_logprobs", "ref_logprobs", "trainer_logprobs")


def _config(**kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        **kwargs,
    )


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def value_model():
    from transformers import LlamaForTokenClassification

    torch.manual_seed(1)
    return LlamaForTokenClassification(_config(num_labels=1)).eval()


def _layout(rows=ROWS):
    """``input_ids``, ``attention_mask``, ``completion_mask`` and the observation mask."""
    width = max(sum(n for _, n in row) for row in rows) + 2  # every row padded
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width))
    obs = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        t = 0
        for kind, n in row:
            ids[i, t : t + n] = torch.randint(1, VOCAB, (n,), generator=gen)
            attention[i, t : t + n] = 1
            if kind == "a":
                comp[i, t : t + n] = 1
            elif kind == "o":
                obs[i, t : t + n] = 1
            t += n
    return ids, attention, comp, obs


def _last_turn(comp: torch.Tensor) -> torch.Tensor:
    """1 on each multi-turn row's last turn (its masked tokens after its last gap)."""
    out = torch.zeros_like(comp)
    for i in range(comp.shape[0]):
        on = comp[i].nonzero().flatten().tolist()
        gaps = [k for k in range(1, len(on)) if on[k] != on[k - 1] + 1]
        if gaps:
            out[i, on[gaps[-1]] :] = comp[i, on[gaps[-1]] :]
    return out


def _batch(model, per_token_advantages: bool = False) -> dict:
    """A multi-turn batch with the rollout's fields as the engine and the roles give them."""
    ids, attention, comp, _ = _layout()
    with torch.no_grad():
        new = batch_logprobs(model, {"input_ids": ids, "attention_mask": attention})
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(comp.shape, generator=gen) * 0.3
    if per_token_advantages:
        advantages = torch.randn(comp.shape, generator=gen) * comp
    else:
        advantages = group_advantages([1.0, 0.0, 0.2, 0.9, 0.5, 0.1], 2, "rloo")
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": comp,
        "sequence_starts": first_tokens(comp),
        # The engine's log-probs on its own tokens only: 0 on observations (none sampled).
        "old_logprobs": (new + noise) * comp,
        "ref_logprobs": (new - noise.abs()) * comp,
        "trainer_logprobs": (new + 0.5 * noise) * comp,
        "advantages": advantages,
    }


def _outside(batch: dict, fields, value: float) -> dict:
    """``batch`` with ``fields`` set to +-``value`` (alternating) wherever the mask is 0."""
    off = batch["completion_mask"] == 0
    sign = torch.ones(off.shape)
    sign[:, 1::2] = -1
    out = dict(batch)
    for f in fields:
        out[f] = torch.where(off, sign * value, batch[f])
    return out


def _on_last_turn(batch: dict, fields, delta: float) -> dict:
    """``batch`` with ``delta`` added to ``fields`` on each multi-turn row's last turn."""
    last = _last_turn(batch["completion_mask"]) > 0
    return {**batch, **{f: torch.where(last, batch[f] + delta, batch[f]) for f in fields}}


def _run(model, loss_fn, batch):
    """Loss, metrics and every parameter's gradient of one backward."""
    model.zero_grad(set_to_none=True)
    loss, metrics = loss_fn(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), metrics, grads


def _same(a, b) -> bool:
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
    return (
        torch.equal(loss_a, loss_b)
        and metrics_a == metrics_b
        and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))
    )


def _finite(run) -> bool:
    loss, metrics, grads = run
    return (
        bool(torch.isfinite(loss))
        and all(v == v and abs(v) != float("inf") for v in metrics.values())
        and all(bool(torch.isfinite(g).all()) for g in grads)
    )


# ----- the layout ---------------------------------------------------------------------------


def test_layout_has_gaps_and_first_tokens_marks_one_start_per_row():
    _, attention, comp, obs = _layout()
    assert bool((obs * comp == 0).all()) and bool((obs <= attention).all())
    assert int(_last_turn(comp).sum()) > 0  # multi-turn rows present
    starts = first_tokens(comp)
    assert starts.sum(1).tolist() == [1, 1, 1, 1, 1, 0]  # the empty completion: none
    first = [int(r.nonzero()[0]) if r.any() else None for r in comp]
    for i, t in enumerate(first):
        if t is not None:
            assert starts[i, t] == 1


def test_a_gapped_row_is_one_sequence_to_the_per_sequence_modes():
    _, _, comp, _ = _layout()
    values = torch.randn(comp.shape, generator=torch.Generator().manual_seed(3))
    starts = first_tokens(comp)
    rows = [i for i in range(len(comp)) if comp[i].any()]
    means = [float((values[i] * comp[i]).sum() / comp[i].sum()) for i in rows]
    sums = [float((values[i] * comp[i]).sum()) for i in rows]
    got = aggregate(values, comp, starts, LossAgg.SEQ_MEAN_TOKEN_MEAN)
    assert float(got) == pytest.approx(sum(means) / len(rows), abs=1e-6)
    got = aggregate(values, comp, starts, LossAgg.SEQ_MEAN_TOKEN_SUM)
    assert float(got) == pytest.approx(sum(sums) / len(rows), abs=1e-6)


# ----- the losses ignore what lies outside the mask -----------------------------------------


def test_kl_to_reference_drops_the_outside_before_the_exp():
    new = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, 1e4, -0.25]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert torch.isinf(kl_to_reference(new, ref)[0, 1])  # why the mask has to come first
    kl = kl_to_reference(new, ref, mask)
    assert kl[0, 1] == 0 and torch.equal(kl[:, [0, 2]], kl_to_reference(new, ref)[:, [0, 2]])


@pytest.mark.parametrize("value", [1e4, float("inf")])
@pytest.mark.parametrize("per_token", [False, True], ids=["row-adv", "token-adv"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("tis_cap", [None, 2.0])
@pytest.mark.parametrize("mode", list(LossAgg))
def test_policy_loss_ignores_every_field_outside_the_mask(
    model, mode, tis_cap, kl_coef, per_token, value
):
    batch = _batch(model, per_token_advantages=per_token)

    def loss_fn(m, b):
        return policy_loss(
            m,
            b,
            clip_high=0.28,
            loss_agg=mode,
            tis_cap=tis_cap,
            kl_coef=kl_coef,
            norm_tokens=NORM,
        )

    base = _run(model, loss_fn, batch)
    assert _finite(base)
    fields = LOGPROB_FIELDS + (("advantages",) if per_token else ())
    for v in (value, -value):
        assert _same(_run(model, loss_fn, _outside(batch, fields, v)), base)

    # The control: the fields that count, moved on a later turn's tokens, move the loss.
    live = ["old_logprobs"]
    live += ["trainer_logprobs"] if tis_cap else []
    live += ["ref_logprobs"] if kl_coef else []
    live += ["advantages"] if per_token else []
    for f in live:
        moved = _run(model, loss_fn, _on_last_turn(batch, [f], 0.5))
        assert not torch.equal(moved[0], base[0]), f


@pytest.mark.parametrize("kwargs", [{}, {"tis_cap": 2.0, "kl_coef": 0.1}])
def test_grpo_loss_ignores_every_field_outside_the_mask(model, kwargs):
    batch = _batch(model)

    def loss_fn(m, b):
        return grpo_loss(m, b, clip=0.2, **kwargs)

    base = _run(model, loss_fn, batch)
    for v in (1e4, -1e4, float("inf"), float("-inf")):
        assert _same(_run(model, loss_fn, _outside(batch, LOGPROB_FIELDS, v)), base)
    moved = _run(model, loss_fn, _on_last_turn(batch, ["old_logprobs"], 0.5))
    assert not torch.equal(moved[0], base[0])


def _ppo_batch(model, seed: int = 4) -> tuple[dict, torch.Tensor]:
    batch = _batch(model)
    gen = torch.Generator().manual_seed(seed)
    batch["values"] = torch.randn(batch["completion_mask"].shape, generator=gen)
    return batch, torch.tensor([1.0, -0.5, 2.0, 0.7, 0.0, 0.3])


def test_ppo_advantages_ignore_values_and_logprobs_outside_the_mask(model):
    batch, scores = _ppo_batch(model)
    fields = ("values", "old_logprobs", "ref_logprobs")
    keys = ("advantages", "returns", "old_values", "token_rewards")
    base = ppo_advantages(batch, scores, kl_coef=0.05, gamma=0.99, lam=0.9)
    off = batch["completion_mask"] == 0
    for key in ("advantages", "returns", "old_values"):
        assert bool((base[key][off] == 0).all()), key
    for v in (1e4, -1e4, float("inf"), float("-inf")):
        out = ppo_advantages(_outside(batch, fields, v), scores, kl_coef=0.05, gamma=0.99, lam=0.9)
        for key in keys:
            assert torch.equal(out[key], base[key]), (key, v)

    # The control: a later turn's values reach the first turn's advantages across the gap.
    first = (batch["completion_mask"] > 0) & (_last_turn(batch["completion_mask"]) == 0)
    moved = ppo_advantages(
        _on_last_turn(batch, ["values"], 0.5), scores, kl_coef=0.05, gamma=0.99, lam=0.9
    )
    assert not torch.equal(moved["advantages"][first], base["advantages"][first])


def test_ppo_policy_loss_ignores_values_outside_the_mask(model):
    batch, scores = _ppo_batch(model)
    fields = ("values", "old_logprobs", "ref_logprobs")

    def loss_fn(m, b):
        return policy_loss(m, ppo_advantages(b, scores, kl_coef=0.05), kl_coef=0.1)

    base = _run(model, loss_fn, batch)
    for v in (1e4, -1e4):
        assert _same(_run(model, loss_fn, _outside(batch, fields, v)), base)
    moved = _run(model, loss_fn, _on_last_turn(batch, ["values"], 0.5))
    assert not torch.equal(moved[0], base[0])


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_ignores_returns_and_old_values_outside_the_mask(model, value_model, clip):
    batch, scores = _ppo_batch(model)
    batch = ppo_advantages(batch, scores, kl_coef=0.05)
    with torch.no_grad():  # old values away from the returns, so that some are clipped
        batch["old_values"] = batch["old_values"] + 0.3 * batch["completion_mask"]

    def loss_fn(m, b):
        return value_loss(m, b, clip=clip)

    base = _run(value_model, loss_fn, batch)
    assert _finite(base)
    for v in (1e4, -1e4, 1e20, float("inf"), float("-inf")):  # 1e20 squared overflows
        assert _same(
            _run(value_model, loss_fn, _outside(batch, ["returns", "old_values"], v)), base
        )
    moved = _run(value_model, loss_fn, _on_last_turn(batch, ["returns"], 0.5))
    assert not torch.equal(moved[0], base[0])


# ----- GAE and returns-to-go across the gaps ------------------------------------------------


def _former_gae(rewards, values, mask, gamma, lam):
    """The recursion before multi-turn rows: it restarted at every mask-0 position."""
    mask = mask.float()
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0])
    next_value = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running * m
        running = running * m
        next_value = values[:, t] * m
    return adv, (adv + values) * mask


def _former_returns(rewards, mask, gamma):
    mask = mask.float()
    out = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros(rewards.shape[0], dtype=torch.float32)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t].float() + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def _single_turn(seed: int, rows: int = 16, width: int = 24):
    """Random rows of prompt, one completion (maybe empty), padding, as the batches build."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, width)
    for i in range(rows):
        start = int(torch.randint(0, 6, (1,), generator=gen))
        stop = int(torch.randint(start, width + 1, (1,), generator=gen))
        mask[i, start:stop] = 1
    rewards = torch.randn(rows, width, generator=gen) * mask
    rewards[:, 0] += torch.randn(rows, generator=gen) * (mask.sum(1) == 0)  # an empty row's score
    values = torch.randn(rows, width, generator=gen) * mask
    return rewards, values, mask


@pytest.mark.parametrize("seed", range(8))
def test_rows_without_gaps_get_the_former_gae_and_returns_bit_for_bit(seed):
    rewards, values, mask = _single_turn(seed)
    if seed % 2:  # values outside the mask too: the former recursion never used them either
        values = values + torch.randn(values.shape, generator=torch.Generator().manual_seed(seed))
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 1.0)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        old_adv, old_ret = _former_gae(rewards, values, mask, gamma, lam)
        assert torch.equal(adv, old_adv) and torch.equal(ret, old_ret)
        assert torch.equal(
            discounted_returns(rewards, mask, gamma), _former_returns(rewards, mask, gamma)
        )


def _gapped_row(seed: int):
    """One row: prompt, turn 1, observations, turn 2, observations, turn 3, padding."""
    segments = [("p", 3), ("a", 4), ("o", 3), ("a", 5), ("o", 2), ("a", 2), ("pad", 3)]
    gen = torch.Generator().manual_seed(seed)
    width = sum(n for _, n in segments)
    mask, kept = torch.zeros(1, width), []
    t = 0
    for kind, n in segments:
        if kind == "a":
            mask[0, t : t + n] = 1
        if kind != "o":
            kept += range(t, t + n)
        t += n
    rewards = torch.randn(1, width, generator=gen)  # garbage outside the mask: never read
    values = torch.randn(1, width, generator=gen)
    return rewards, values, mask, torch.tensor(kept)


@pytest.mark.parametrize("seed", range(4))
def test_a_turn_gets_the_advantages_of_its_row_without_the_observations(seed):
    rewards, values, mask, kept = _gapped_row(seed)
    gamma, lam = 0.95, 0.9
    adv, ret = gae(rewards, values, mask, gamma, lam)
    cut_adv, cut_ret = gae(rewards[:, kept], values[:, kept], mask[:, kept], gamma, lam)
    assert torch.equal(adv[:, kept], cut_adv) and torch.equal(ret[:, kept], cut_ret)
    assert bool((adv[mask == 0] == 0).all()) and bool((ret[mask == 0] == 0).all())
    # The former recursion cut turn 1 off from the later turns: this check would fail on it.
    old_adv, _ = _former_gae(rewards, values, mask, gamma, lam)
    assert not torch.equal(old_adv[:, kept], cut_adv)

    returns = discounted_returns(rewards, mask, gamma)
    assert torch.equal(returns[:, kept], discounted_returns(rewards[:, kept], mask[:, kept], gamma))
    assert bool((returns[mask == 0] == 0).all())
    assert not torch.equal(_former_returns(rewards, mask, gamma)[:, kept], returns[:, kept])


# ----- packing ------------------------------------------------------------------------------

ORDER = [3, 1, 0, 5, 2, 4]


def test_packing_keeps_the_gapped_mask_exactly(model):
    batch = _batch(model)
    lengths = sequence_lengths(batch)
    packed = pack(batch, ORDER, lengths)
    width = batch["completion_mask"].shape[1]
    for key in ("completion_mask", "sequence_starts", "old_logprobs"):
        back = unpack(packed[key], packed, width)
        assert torch.equal(back, batch[key][ORDER]), key
    assert int(packed["sequence_starts"].sum()) == 5


@pytest.mark.parametrize("mode", list(LossAgg))
def test_packed_multi_turn_loss_equals_padded(model, mode):
    batch = _batch(model)

    def loss(m, b):
        out, _ = policy_loss(
            m, b, clip_high=0.28, loss_agg=mode, tis_cap=2.0, kl_coef=0.1, norm_tokens=NORM
        )
        return float(out.detach())

    padded = loss(model, batch)
    packed = pack(batch, ORDER)
    assert abs(loss(PackedModel(model), packed) - padded) <= 1e-5
    # Outside the mask the packed row ignores the fields too.
    perturbed = pack(_outside(batch, LOGPROB_FIELDS, 1e4), ORDER)
    assert loss(PackedModel(model), perturbed) == loss(PackedModel(model), packed)


@pytest.mark.parametrize("mode", list(LossAgg))
def test_weighted_packed_micro_batches_of_multi_turn_rows_add_up_to_the_full_batch(model, mode):
    """The trainer's packed path: budgeted micro-batches weighted by their loss tokens."""
    batch = _batch(model)

    def loss(m, b):
        out, _ = policy_loss(m, b, loss_agg=mode, kl_coef=0.1, norm_tokens=NORM)
        return float(out.detach())

    field = "completion_mask" if mode is LossAgg.TOKEN_MEAN else "sequence_starts"
    lengths = sequence_lengths(batch)
    (step,) = plan_token_step(lengths, budget=24)
    assert len(step) > 1
    micro = weigh_parts(counted_packed_parts(batch, step, field, lengths))
    summed = sum(loss(PackedModel(model), part) * w for part, w in micro)
    assert abs(summed - loss(model, batch)) <= 1e-5
