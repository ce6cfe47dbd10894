"""The reward model: an HF sequence-classification model, one score per prompt + completion.

Forward-only and resident in SCORE by default, beside (or instead of) a Python reward function.
:func:`init_reward_model` and :func:`fit_reward_model` make a small one locally (the examples
train one in seconds on synthetic completions labelled by the toy rule); any local directory
with a single-score head works.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from colocate.algorithms.packing import forward_kwargs, is_packed, last_token_index
from colocate.core.phases import Phase
from colocate.operations.memory_plan import ModelHead
from colocate.roles.base import Role
from colocate.roles.frozen import FrozenModelActor, FrozenModelConfig
from colocate.roles.role_checks import check_single_score_head

__all__ = [
    "RewardModelConfig",
    "RewardModelActor",
    "reward_model_role",
    "init_reward_model",
    "fit_reward_model",
    "sequence_scores",
    "batch_scores",
]


class RewardModelConfig(FrozenModelConfig):
    """What the reward model loads: ``model``, a ``*ForSequenceClassification`` with one label."""


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's score [B] of each right-padded row, read at its last attended token.

    The last token is found from ``attention_mask``, not from the pad id (a completion may
    end in a token equal to it).
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
    logits = model.score(hidden).squeeze(-1).float()  # [B, T]
    last = attention_mask.long().sum(1).clamp(min=1) - 1
    return logits.gather(1, last.unsqueeze(1)).squeeze(1)


def batch_scores(model, batch: dict) -> torch.Tensor:
    """:func:`sequence_scores` of a padded batch, or of a packed micro-batch's sequences [k].

    Packed (``colocate.algorithms.packing``), each score is read at its own sequence's last
    token in the row.
    """
    if not is_packed(batch):
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    kwargs = forward_kwargs(batch["input_ids"], position_ids=batch["position_ids"])
    logits = model.score(model.base_model(**kwargs)[0]).squeeze(-1).float()  # [1, N]
    return logits[0, last_token_index(batch)]


class RewardModelActor(FrozenModelActor):
    """One rank of the reward model (fp32, frozen, forward-only, one score per sequence)."""

    auto_class = "AutoModelForSequenceClassification"
    head = ModelHead.SEQUENCE_SCORE
    outputs = 1
    forward_fn = staticmethod(batch_scores)
    span_name = "reward_model.scores"
    check_model = staticmethod(check_single_score_head)
    needs = {"score": "use a decoder-style *ForSequenceClassification model"}

    def scores(self, batch: dict) -> torch.Tensor:
        """One score per row [B] of ``input_ids`` / ``attention_mask`` (prompt + completion)."""
        return self.forward_batch(batch)


def reward_model_role(
    model: str,
    *,
    micro_batch_size: int = 16,
    max_tokens_per_micro_batch: int | None = None,
    phases: frozenset[Phase] = frozenset({Phase.SCORE}),
    bundles: tuple[int, ...] | None = None,
    gpu_fraction: float = 0.1,
) -> Role:
    """The reward model as a :class:`~colocate.roles.base.Role` named ``"reward"``."""
    config = RewardModelConfig(model, micro_batch_size, max_tokens_per_micro_batch)
    return Role("reward", RewardModelActor, config, phases, bundles, gpu_fraction)


def init_reward_model(policy_model: str, out: str | Path, seed: int = 0) -> Path:
    """A fresh single-score model of the policy's architecture and tokenizer, saved in ``out``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out)
    config = AutoConfig.from_pretrained(policy_model, num_labels=1)
    tok = AutoTokenizer.from_pretrained(policy_model)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).float()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def fit_reward_model(
    path: str | Path,
    sample: Callable[[random.Random], tuple[Sequence[int], float]],
    *,
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    pad_id: int = 0,
) -> dict[str, float]:
    """Regresses the model in ``path`` on ``sample(rng) -> (token ids, target)``; saves it.

    Mean squared error, AdamW; returns the first and last batches' losses and the correlation
    of scores with targets on a fresh held-out batch.
    """
    from transformers import AutoModelForSequenceClassification

    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def draw(n: int):
        rows = [sample(rng) for _ in range(n)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (seq, _) in enumerate(rows):
            ids[i, : len(seq)] = torch.tensor(list(seq))
            mask[i, : len(seq)] = 1
        return ids, mask, torch.tensor([t for _, t in rows], dtype=torch.float32)

    losses = []
    model.train()
    for _ in range(steps):
        ids, mask, target = draw(batch_size)
        loss = torch.nn.functional.mse_loss(sequence_scores(model, ids, mask), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        ids, mask, target = draw(256)
        pred = sequence_scores(model, ids, mask)
        corr = float(torch.corrcoef(torch.stack([pred, target]))[0, 1])
    model.save_pretrained(path, safe_serialization=True)
    return {"first_loss": losses[0], "last_loss": losses[-1], "heldout_corr": corr}
