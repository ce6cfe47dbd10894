"""The critic: a value model trained with its own DeepSpeed optimizer, beside the policy.

The policy's architecture with a scalar head per token (HF ``*ForTokenClassification`` with one
label, its body loaded from the policy's directory or from a given model), in a torch.distributed
group of its own (one rank beside each trainer rank by default), ZeRO like the policy, offloaded
and reloaded like the trainer. Resident in SCORE (its values of the rollout feed GAE) and TRAIN.
Its checkpoint is written with the policy's (``Coordinator.save_trainer``), and a dead rank is
replaced together with its group and restored from the last one.

``values`` are aligned with the tokens they judge: ``values[:, t]`` is the value of the state
before token ``t`` (the model's output at ``t - 1``); position 0 gets 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from colocate.actors.training import RankTrainer
from colocate.algorithms.metrics import merge_metrics
from colocate.algorithms.micro_batches import plan_token_step, token_step_counts
from colocate.algorithms.packing import forward_kwargs, forward_packed, sequence_lengths
from colocate.core.config import ConfigError, TrainerConfig
from colocate.core.contract import Seat
from colocate.core.phases import Phase, RoleMemory
from colocate.operations.memory_plan import ModelHead, RoleFootprint, model_shape
from colocate.roles.base import Role, RoleActor, takes_max_rows
from colocate.roles.role_checks import check_model_dir, check_same_vocabulary

__all__ = [
    "CriticConfig",
    "CriticActor",
    "critic_role",
    "token_values",
    "batch_values",
    "value_loss",
]


@dataclass(frozen=True)
class CriticConfig:
    """What the critic trains.

    Attributes:
        trainer: Its optimizer, ZeRO stage, micro-batches and model directory (the policy's,
            or a value model's); ``loss_tokens`` names the mask its loss averages over.
        value_clip: PPO's value clipping around the rollout's values (None: unclipped).
        timeout_s: Bound on the critic group's collectives.
    """

    trainer: TrainerConfig
    value_clip: float | None = 0.2
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.trainer, TrainerConfig):
            raise ConfigError(
                f"CriticConfig.trainer={self.trainer!r}: must be a TrainerConfig; fix: "
                "CriticConfig(TrainerConfig(model=path, ...))"
            )
        c = self.value_clip
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0):
            raise ConfigError(
                f"CriticConfig.value_clip={c!r}: must be a number > 0 or None; fix: e.g. 0.2"
            )


def token_values(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Values [B, T]: position ``t`` holds the value of the state before token ``t``.

    Padded rows with ``attention_mask``, or one packed row with ``position_ids``
    (``colocate.algorithms.packing``): each sequence's first token gets 0.
    """
    kwargs = forward_kwargs(input_ids, attention_mask, position_ids)
    out = model(**kwargs).logits.squeeze(-1).float()
    out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    return out if position_ids is None else out.masked_fill(position_ids == 0, 0.0)


def batch_values(model, batch: dict) -> torch.Tensor:
    """:func:`token_values` of a padded batch or a packed micro-batch."""
    return token_values(
        model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
    )


def value_loss(model, batch: dict, clip: float | None = 0.2):
    """PPO's value loss: 0.5 x squared error to ``returns`` (clipped around ``old_values``).

    Means over ``completion_mask`` tokens; ``returns`` and ``old_values`` outside it (prompt,
    padding, a multi-turn row's observation tokens) are never read. Metrics: ``value_loss``,
    ``value_clip_fraction``, ``value_mean``.
    """
    mask = batch["completion_mask"].float()
    on = mask > 0
    tokens = mask.sum().clamp(min=1.0)
    v = batch_values(model, batch)
    ret = batch["returns"].float()
    # The errors are dropped outside the mask before they are squared: a product with the
    # mask afterwards turns an overflowing square (or its gradient) into NaN.
    err = torch.where(on, v - ret, 0.0) ** 2
    clipped = torch.zeros(())
    if clip is not None:
        old = batch["old_values"].float()
        vc = old + (v - old).clamp(-clip, clip)
        err_c = torch.where(on, vc - ret, 0.0) ** 2
        clipped = ((err_c > err).float() * mask).sum() / tokens
        err = torch.maximum(err, err_c)
    loss = 0.5 * (err * mask).sum() / tokens
    with torch.no_grad():
        metrics = {
            "value_loss": float(loss),
            "value_clip_fraction": float(clipped),
            "value_mean": float((v * mask).sum() / tokens),
        }
    return loss, metrics


class CriticActor(RoleActor):
    """One critic rank: a trainer with a value head and a value loss.

    Its backend, group, train loop, offload and checkpoints are the policy trainer's
    (:class:`~colocate.actors.training.RankTrainer`); what it adds is the model
    (``*ForTokenClassification`` with one label), :func:`value_loss` and :meth:`values`.
    """

    collective = True
    stateful = True
    trainable = True

    def __init__(self, seat: Seat):
        super().__init__(seat)
        config: CriticConfig = seat.config
        self.training = RankTrainer(
            config.trainer,
            seat,
            functools.partial(value_loss, clip=config.value_clip),
            self._value_model,
            self.span,
        )

    @classmethod
    def check_config(cls, config: CriticConfig, policy_model: str) -> None:
        """The model directory exists and has the policy's vocabulary."""
        if not isinstance(config, CriticConfig):
            raise ConfigError(f"critic config {config!r}: must be a CriticConfig")
        check_model_dir("CriticConfig.trainer.model", config.trainer.model)
        check_same_vocabulary("CriticConfig.trainer.model", config.trainer.model, policy_model)

    token_budget_field = "trainer.max_tokens_per_micro_batch"

    @classmethod
    def token_budget(cls, config: CriticConfig) -> int | None:
        """``config.trainer.max_tokens_per_micro_batch``."""
        return config.trainer.max_tokens_per_micro_batch

    @classmethod
    def footprint(cls, config: CriticConfig) -> RoleFootprint:
        """Trainer-like: the policy trainer's rows at its own ZeRO stage, dtype and world."""
        from colocate.operations.memory_check import trainer_footprint

        shape = model_shape(config.trainer.model, ModelHead.TOKEN_SCORE)
        return trainer_footprint(config.trainer, shape, outputs=1)

    def _value_model(self) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification
        from transformers.utils import logging

        # Its load report lists the LM head left out and the new value head: expected here.
        logging.set_verbosity_error()
        return AutoModelForTokenClassification.from_pretrained(
            self.config.trainer.model, num_labels=1, dtype=torch.float32
        )

    def host_group_store(self, multi_node: bool, timeout_s: float) -> tuple[str, int]:
        """Rank 0: starts the critic group's store (:meth:`RankTrainer.host_group_store`)."""
        return self.training.host_group_store(multi_node, timeout_s)

    def join(self, master: tuple[str, int] | None) -> RoleMemory:
        """Joins the critic group at ``master`` and builds model and optimizer (resident)."""
        self.training.start(master, self.config.timeout_s)
        return RoleMemory.RESIDENT

    def release(self) -> None:
        """Params, grads and optimizer states to host memory (the trainer's offload)."""
        self.training.offload(keep_params=False)

    def acquire(self) -> None:
        """Everything back to the device."""
        self.training.reload()

    @takes_max_rows
    @torch.no_grad()
    def values(self, batch: dict, max_rows: int | None = None) -> torch.Tensor:
        """Values [B, T] of ``input_ids`` / ``attention_mask`` (see :func:`token_values`).

        Collective under ZeRO-3: every rank runs as many micro-batch forwards as the largest
        shard (``max_rows``, passed by the driver; None: this shard's rows) needs; a rank with
        fewer rows runs fillers, whose outputs are dropped. With a token budget the rows are
        packed and the ranks agree on the count of forwards first (``RankTrainer.agree_max``).
        """
        self.require_resident("values")
        rows = len(batch["input_ids"])
        backend = self.training.backend
        budget = self.config.trainer.max_tokens_per_micro_batch
        if budget is not None:
            lengths = sequence_lengths(batch)
            counts = self.training.agree_max(token_step_counts(lengths, budget))
            (step,) = plan_token_step(lengths, budget, 1, counts)
            fn = functools.partial(batch_values, backend.model)
            with self.span("critic.values", rows=rows, forwards=len(step)):
                return forward_packed(fn, batch, [m.rows for m in step], lengths, backend.device)
        size = self.config.trainer.micro_batch_size
        count = math.ceil((max_rows or rows) / size) if size else 1
        out = []
        with self.span("critic.values", rows=rows):
            for i in range(count):
                lo, hi = i * rows // count, (i + 1) * rows // count
                part = slice(lo, hi) if hi > lo else slice(0, 1)  # a filler keeps step
                ids = batch["input_ids"][part].to(backend.device)
                mask = batch["attention_mask"][part].to(backend.device)
                v = token_values(backend.model, ids, mask).cpu()
                if hi > lo:
                    out.append(v)
        return torch.cat(out)

    @takes_max_rows
    def train_values(self, shard: dict, max_rows: int | None = None) -> dict[str, float]:
        """The critic's optimizer steps on this rank's shard (all ranks at once).

        :meth:`RankTrainer.train`, the policy trainer's loop, with the value loss: micro-batches,
        mini-batches and epochs planned from the largest rank's shard (``max_rows``, passed by
        the driver).

        Returns:
            ``loss``, ``value_loss``, ``value_clip_fraction`` and ``value_mean``, means over the
            optimizer steps.
        """
        self.require_resident("train_values")
        return merge_metrics(self.training.train(shard, max_rows, span="critic.train"))

    def save(self, path: str) -> str:
        """Checkpoints the critic's model, optimizer and step count under ``path``."""
        return self.training.save(path)

    def load(self, path: str) -> int:
        """Restores a checkpoint written by :meth:`save`; returns the step count."""
        return self.training.load(path)

    def shutdown(self) -> None:
        """Leaves the critic group and closes its store, then what the base class frees."""
        self.training.shutdown()
        super().shutdown()


def critic_role(
    config: CriticConfig,
    *,
    phases: frozenset[Phase] | None = None,
    bundles: tuple[int, ...] | None = None,
    gpu_fraction: float = 0.1,
) -> Role:
    """The critic as a :class:`~colocate.roles.base.Role` named ``"critic"`` (SCORE and TRAIN)."""
    phases = phases or frozenset({Phase.SCORE, Phase.TRAIN})
    if Phase.TRAIN not in phases:
        raise ConfigError(
            f"critic phases={sorted(p.value for p in phases)}: the critic trains, so it must be "
            "resident in TRAIN; fix: include Phase.TRAIN"
        )
    return Role("critic", CriticActor, config, phases, bundles, gpu_fraction)
