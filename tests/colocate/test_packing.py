"""Packed sequences and token-budget micro-batches equal the padded full batch (no Ray).

For every family of the family test, a tiny model of its real HF architecture (fp32, on CPU,
SDPA) and a batch whose sequences run from 1 token to the maximum: the packed, budgeted GRPO
step's gradients equal the padded full-batch step's, and per-token log-probs, values and
reward scores equal the padded forward's, within 1e-5.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from colocate import Family, TinyModelSpec, build_tiny_model, grpo_loss
from colocate.actors.trainer_backend import accumulate
from colocate.algorithms.batches import counted_packed_parts, shard_by_tokens, weigh_parts
from colocate.algorithms.losses import batch_logprobs
from colocate.algorithms.micro_batches import (
    balanced_bins,
    fewest_bins,
    plan_token_step,
    token_step_counts,
)
from colocate.algorithms.packing import (
    PackedModel,
    SequencePackingError,
    check_packing,
    forward_packed,
    pack,
    sequence_lengths,
    unpack,
)
from colocate.roles.critic import batch_values
from colocate.roles.reward_model import batch_scores

pytestmark = pytest.mark.fast

FAMILIES = {
    "llama": TinyModelSpec(),
    "qwen2": TinyModelSpec(family=Family.QWEN2),
    "qwen3": TinyModelSpec(family=Family.QWEN3),
    "mistral": TinyModelSpec(family=Family.MISTRAL),
    "qwen2-tied": TinyModelSpec(family=Family.QWEN2, tie_word_embeddings=True),
    "qwen3-moe": TinyModelSpec(family=Family.QWEN3_MOE),
}
TOL = 1e-5
LONGEST = 48
BUDGET = 96  # two maximum-length sequences per micro-batch


def _batch(vocab: int, rows: int = 12, seed: int = 0) -> dict:
    """Right-padded GRPO rows of 1..LONGEST tokens (both ends present), prompts of 1-4 tokens."""
    rng = random.Random(seed)
    lengths = [1, LONGEST] + [rng.randint(1, LONGEST) for _ in range(rows - 2)]
    ids = torch.zeros((rows, LONGEST), dtype=torch.long)
    mask = torch.zeros((rows, LONGEST), dtype=torch.long)
    comp = torch.zeros((rows, LONGEST))
    gen = torch.Generator().manual_seed(seed)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, :n] = 1
        comp[i, min(n, rng.randint(1, 4)) : n] = 1
    old = torch.randn((rows, LONGEST), generator=gen) * 0.1 - 7.0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": comp,
        "old_logprobs": old * comp,
        "advantages": torch.randn(rows, generator=gen),
        "weight_version": torch.zeros(rows, dtype=torch.long),
    }


def _model(name: str, auto: str = "AutoModelForCausalLM", **kwargs) -> torch.nn.Module:
    import transformers

    path = build_tiny_model(FAMILIES[name])
    cls = getattr(transformers, auto)
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    return model.eval()


def _valid(x: torch.Tensor, batch: dict) -> torch.Tensor:
    return x * batch["attention_mask"]


# ----- planning -----------------------------------------------------------------------------


@settings(deadline=None, max_examples=200)  # a busy 2-core machine: timing is not asserted
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40),
    slack=st.integers(0, 300),
    mini=st.integers(1, 3),
    extra=st.lists(st.integers(0, 2), min_size=3, max_size=3),
)
def test_token_plan_covers_every_row_once_within_budget(lengths, slack, mini, extra):
    budget = max(lengths) + slack
    own = token_step_counts(lengths, budget, mini)
    counts = [c + e for c, e in zip(own, extra, strict=False)]  # as if another rank needed more
    plan = plan_token_step(lengths, budget, mini, counts)
    # the agreed count of micro-batches in every step: the ranks' collectives pair up
    assert [len(step) for step in plan] == counts
    rows = [r for step in plan for mb in step for r in mb.rows]
    assert sorted(rows) == list(range(len(lengths)))
    for step in plan:
        for mb in step:
            assert sum(lengths[r] for r in mb.rows) <= budget
            assert list(mb.rows) == sorted(mb.rows)
    # the fewest bins are few: within twice the lower bound (first-fit's guarantee) plus one
    bound = -(-sum(lengths) // budget)
    assert fewest_bins(lengths, budget) <= 2 * bound + 1


def test_balanced_bins_balance_tokens():
    lengths = [100, 90, 10, 10, 10, 10, 10, 10, 10, 10]
    sums = [sum(lengths[i] for i in b) for b in balanced_bins(lengths, 2)]
    assert sorted(sums) == [130, 140]  # 270 tokens: as even as whole sequences allow


def test_over_budget_sequence_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="exceeds max_tokens_per_micro_batch=10.*at least 11"):
        token_step_counts([3, 11], 10)


def test_counts_below_what_a_step_needs_are_refused():
    with pytest.raises(ValueError, match="counts="):
        plan_token_step([10, 10, 10], 10, 1, [2])


def test_shards_by_tokens_put_answers_back_in_row_order():
    batch = _batch(1000, rows=9)
    shards, order = shard_by_tokens(batch, 2)
    totals = [int(s["attention_mask"].sum()) for s in shards]
    assert abs(totals[0] - totals[1]) <= LONGEST
    merged = torch.cat([s["input_ids"] for s in shards])
    assert torch.equal(merged[torch.tensor(order).argsort()], batch["input_ids"])


# ----- packing ------------------------------------------------------------------------------


def test_pack_and_unpack_round_trip():
    batch = _batch(1000, rows=5)
    lengths = sequence_lengths(batch)
    packed = pack(batch, [3, 0, 4], lengths)
    n = lengths[3] + lengths[0] + lengths[4]
    assert packed["input_ids"].shape == (1, n)
    assert "attention_mask" not in packed
    assert packed["position_ids"][0, lengths[3]] == 0  # the second sequence restarts
    assert packed["advantages"].shape == (1, n)  # per-row values repeated per token
    back = unpack(packed["input_ids"], packed, LONGEST)
    assert torch.equal(back, batch["input_ids"][[3, 0, 4]])


def test_left_padded_rows_are_refused():
    batch = _batch(1000, rows=3)
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(SequencePackingError, match="row 0 is not right-padded"):
        sequence_lengths(batch)


def test_a_packed_loss_without_position_ids_is_refused():
    model = _model("llama")
    packed = pack(_batch(model.config.vocab_size, rows=3), [0, 1, 2])
    with pytest.raises(SequencePackingError, match="without position_ids"):
        PackedModel(model)(input_ids=packed["input_ids"])
    with pytest.raises(KeyError, match="a packed micro-batch has none"):
        packed["attention_mask"]


# ----- equality per family ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_budgeted_step_equals_padded_full_batch(family):
    """Gradients and loss of the packed, budgeted GRPO step = the padded full-batch step."""
    torch.manual_seed(0)
    model = _model(family)
    check_packing(model, family, model.config.vocab_size, atol=1e-4)
    batch = _batch(model.config.vocab_size)
    lengths = sequence_lengths(batch)

    loss, _ = grpo_loss(model, batch)
    loss.backward()
    padded = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    (step,) = plan_token_step(lengths, BUDGET)
    assert len(step) > 1  # the budget does cut the batch
    counted = counted_packed_parts(batch, step, "completion_mask", lengths)
    micro = weigh_parts(counted)
    packed_loss, _ = accumulate(
        lambda m, b: grpo_loss(PackedModel(m), b), model, micro, lambda: None, torch.Tensor.backward
    )
    assert abs(packed_loss - float(loss.detach())) <= TOL
    worst = max(
        float((p.grad - padded[n]).abs().max()) for n, p in model.named_parameters() if n in padded
    )
    assert worst <= TOL, f"{family}: packed gradient differs from the padded one by {worst:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logprobs_values_and_scores_equal_padded(family):
    model = _model(family)
    batch = _batch(model.config.vocab_size, seed=1)
    lengths = sequence_lengths(batch)
    bins = balanced_bins(lengths, fewest_bins(lengths, BUDGET))
    with torch.no_grad():
        padded = _valid(batch_logprobs(model, batch), batch)
        packed = forward_packed(lambda b: batch_logprobs(model, b), batch, bins, lengths)
        assert float((packed - padded).abs().max()) <= TOL

        values = _model(family, "AutoModelForTokenClassification", num_labels=1)
        padded = _valid(batch_values(values, batch), batch)
        packed = forward_packed(lambda b: batch_values(values, b), batch, bins, lengths)
        assert float((packed - padded).abs().max()) <= TOL

        scorer = _model(family, "AutoModelForSequenceClassification", num_labels=1)
        padded = batch_scores(scorer, batch)
        packed = forward_packed(lambda b: batch_scores(scorer, b), batch, bins, lengths)
        assert float((packed - padded).abs().max()) <= TOL


class _IgnoresPositions(torch.nn.Module):
    """A model body that drops ``position_ids``: one causal mask over the packed row."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    @property
    def base_model(self):
        return lambda **kw: self.inner.base_model(input_ids=kw["input_ids"], use_cache=False)


def test_a_model_that_mixes_packed_sequences_is_refused_by_name():
    model = _IgnoresPositions(_model("llama"))
    with pytest.raises(SequencePackingError, match="_IgnoresPositions does not confine attention"):
        check_packing(model, "TrainerConfig.max_tokens_per_micro_batch", 1000, atol=1e-4)
