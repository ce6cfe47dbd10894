"""The reference policy: a frozen copy of the starting policy, scoring sequences forward-only.

Its per-token log-probs of the rollout give the KL penalty of PPO and of GRPO with a KL term.
Resident in SCORE only by default: on a shared GPU it offloads before the trainer reloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colocate.algorithms.losses import token_logprobs
from colocate.core.config import ConfigError
from colocate.core.phases import Phase
from colocate.operations.memory_plan import ModelHead, RoleFootprint, model_shape
from colocate.roles.base import Role, RoleActor
from colocate.roles.role_checks import check_model_dir, check_same_vocabulary

__all__ = ["ReferenceConfig", "ReferenceActor", "reference_role"]


@dataclass(frozen=True)
class ReferenceConfig:
    """What the reference policy loads.

    Attributes:
        model: Local HF directory of the reference (usually the policy's starting model).
        micro_batch_size: Rows per forward.
    """

    model: str
    micro_batch_size: int = 16

    def __post_init__(self) -> None:
        m = self.micro_batch_size
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(
                f"ReferenceConfig.micro_batch_size={m!r}: must be an int >= 1; fix: e.g. 16"
            )


class ReferenceActor(RoleActor):
    """One rank of the reference policy (fp32, frozen, forward-only)."""

    @classmethod
    def check_config(cls, config: ReferenceConfig, policy_model: str) -> None:
        """The model directory exists and has the policy's vocabulary."""
        check_model_dir("ReferenceConfig.model", config.model)
        check_same_vocabulary("ReferenceConfig.model", config.model, policy_model)

    @classmethod
    def footprint(cls, config: ReferenceConfig) -> RoleFootprint:
        """Frozen and forward-only: fp32 weights, ``micro_batch_size`` rows' forward."""
        shape = model_shape(config.model, ModelHead.CAUSAL_LM)
        return RoleFootprint.frozen(shape, 4, config.micro_batch_size)

    def build(self) -> torch.nn.Module:
        """The reference model in host memory, fp32 like the trainer's master weights."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=torch.float32)
        model.requires_grad_(False)
        return model

    @torch.no_grad()
    def logprobs(self, batch: dict) -> torch.Tensor:
        """Per-token log-probs [B, T] of ``batch["input_ids"]`` (position 0 gets 0), on host.

        Needs ``input_ids`` and ``attention_mask``; computed ``micro_batch_size`` rows at a time.
        """
        self.require_resident("logprobs")
        with self.span("reference.logprobs", rows=len(batch["input_ids"])):
            return self.forward_rows(token_logprobs, batch, self.config.micro_batch_size)


def reference_role(
    model: str,
    *,
    micro_batch_size: int = 16,
    phases: frozenset[Phase] = frozenset({Phase.SCORE}),
    bundles: tuple[int, ...] | None = None,
    gpu_fraction: float = 0.1,
) -> Role:
    """The reference policy as a :class:`~colocate.roles.base.Role` named ``"reference"``."""
    return Role(
        "reference",
        ReferenceActor,
        ReferenceConfig(model, micro_batch_size),
        phases,
        bundles,
        gpu_fraction,
    )
