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
import os
import warnings
from dataclasses import dataclass

import torch

from colocate.algorithms.batches import weighted_parts
from colocate.algorithms.micro_batches import plan_step
from colocate.core.config import ConfigError, TrainerConfig
from colocate.core.phases import Phase, RoleMemory
from colocate.operations.memory_plan import ModelHead, RoleFootprint, model_shape
from colocate.roles.base import Role, RoleActor
from colocate.roles.role_checks import check_model_dir, check_same_vocabulary

__all__ = ["CriticConfig", "CriticActor", "critic_role", "token_values", "value_loss"]


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


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Values [B, T]: position ``t`` holds the value of the state before token ``t``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
    return torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)


def value_loss(model, batch: dict, clip: float | None = 0.2):
    """PPO's value loss: 0.5 x squared error to ``returns`` (clipped around ``old_values``).

    Means over ``completion_mask`` tokens. Metrics: ``value_loss``, ``value_clip_fraction``,
    ``value_mean``.
    """
    mask = batch["completion_mask"].float()
    tokens = mask.sum().clamp(min=1.0)
    v = token_values(model, batch["input_ids"], batch["attention_mask"])
    ret = batch["returns"].float()
    err = (v - ret) ** 2
    clipped = torch.zeros(())
    if clip is not None:
        old = batch["old_values"].float()
        vc = old + (v - old).clamp(-clip, clip)
        err_c = (vc - ret) ** 2
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
    """One critic rank: a DeepSpeed (or plain torch, one rank) value model."""

    collective = True
    stateful = True

    @classmethod
    def check_config(cls, config: CriticConfig, policy_model: str) -> None:
        """The model directory exists and has the policy's vocabulary."""
        if not isinstance(config, CriticConfig):
            raise ConfigError(f"critic config {config!r}: must be a CriticConfig")
        check_model_dir("CriticConfig.trainer.model", config.trainer.model)
        check_same_vocabulary("CriticConfig.trainer.model", config.trainer.model, policy_model)

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
        torch.manual_seed(self.config.trainer.seed)
        return AutoModelForTokenClassification.from_pretrained(
            self.config.trainer.model, num_labels=1, dtype=torch.float32
        )

    def join(self, master: tuple[str, int] | None) -> RoleMemory:
        """Joins the critic group at ``master`` and builds model and optimizer (resident)."""
        from colocate.actors.backends import make_backend
        from colocate.actors.cpu.ds_ops import op_environment, prepare_ops

        cfg = self.config.trainer
        os.environ.update(op_environment())
        # As in the trainer: DeepSpeed's calls of deprecated torch.distributed APIs.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        if cfg.deepspeed:
            prepare_ops(self.config.timeout_s)
        self.backend = make_backend(cfg, self.rank, self.world_size, self._value_model)
        store = self._group_store[0] if self._group_store else None
        if self.rank != 0:
            from weight_sync.store import join_store

            store = join_store(
                *master, self.world_size, self.config.timeout_s, f"{self.role}-group"
            )
        self.backend.start(store, master, self.config.timeout_s)
        self.steps = 0
        return RoleMemory.RESIDENT

    def release(self) -> None:
        """Params, grads and optimizer states to host memory (the trainer's offload)."""
        self.backend.offload(False)

    def acquire(self) -> None:
        """Everything back to the device."""
        self.backend.reload()

    def _micro_count(self, rows: int) -> int:
        """The most micro-batches any rank needs (ZeRO-3 gathers run in step on every rank)."""
        import torch.distributed as dist

        size = self.config.trainer.micro_batch_size or rows
        n = torch.tensor([math.ceil(rows / size), rows])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return int(n[0]), int(n[1])

    @torch.no_grad()
    def values(self, batch: dict) -> torch.Tensor:
        """Values [B, T] of ``input_ids`` / ``attention_mask`` (see :func:`token_values`).

        Collective under ZeRO-3: every rank runs as many micro-batch forwards as the largest
        shard needs (a rank with fewer rows runs fillers, whose outputs are dropped).
        """
        self.require_resident("values")
        rows = len(batch["input_ids"])
        count, _ = self._micro_count(rows)
        model = self.backend.model
        out = []
        with self.span("critic.values", rows=rows):
            for i in range(count):
                lo, hi = i * rows // count, (i + 1) * rows // count
                part = slice(lo, hi) if hi > lo else slice(0, 1)  # a filler keeps step
                ids = batch["input_ids"][part].to(self.backend.device)
                mask = batch["attention_mask"][part].to(self.backend.device)
                v = token_values(model, ids, mask).cpu()
                if hi > lo:
                    out.append(v)
        return torch.cat(out)

    def train_values(self, shard: dict) -> dict[str, float]:
        """The critic's optimizer steps on this rank's shard (all ranks at once).

        Micro-batches, mini-batches and epochs as the policy's trainer plans them
        (``colocate.algorithms.micro_batches``), from the largest rank's shard.
        """
        self.require_resident("train_values")
        cfg = self.config.trainer
        rows = len(shard["input_ids"])
        _, max_rows = self._micro_count(rows)
        plan = plan_step(rows, max_rows, cfg.mini_batches, cfg.micro_batch_size)
        loss_fn = functools.partial(value_loss, clip=self.config.value_clip)
        results = []
        with self.span("critic.train", rows=rows):
            for _ in range(cfg.epochs):
                for step in plan:
                    micro = weighted_parts(shard, step, cfg.loss_tokens)
                    results.append(self.backend.step(loss_fn, micro, lambda: None))
        self.steps += 1
        rows_out = [{"loss": loss, **m} for loss, m in results]
        return {k: sum(r[k] for r in rows_out) / len(rows_out) for k in rows_out[0]}

    def save(self, path: str) -> str:
        """Checkpoints the critic's model, optimizer and step count under ``path``."""
        self.backend.save(path, self.steps)
        return path

    def load(self, path: str) -> int:
        """Restores a checkpoint written by :meth:`save`; returns the step count."""
        self.steps = self.backend.load(path)
        return self.steps

    def shutdown(self) -> None:
        """Leaves the critic group, then what the base class frees."""
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.shutdown()
            self.backend = None
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
