"""The reference policy: a frozen copy of the starting policy, scoring sequences forward-only.

Its per-token log-probs of the rollout give the KL penalty of PPO and of GRPO with a KL term.
Resident in SCORE only by default: on a shared GPU it offloads before the trainer reloads.
"""

from __future__ import annotations

import torch

from colocate.algorithms.losses import batch_logprobs
from colocate.core.phases import Phase
from colocate.operations.memory_plan import ModelHead
from colocate.roles.base import Role
from colocate.roles.frozen import FrozenModelActor, FrozenModelConfig

__all__ = ["ReferenceConfig", "ReferenceActor", "reference_role"]


class ReferenceConfig(FrozenModelConfig):
    """What the reference policy loads: ``model``, usually the policy's starting model."""


class ReferenceActor(FrozenModelActor):
    """One rank of the reference policy (fp32, frozen, forward-only, causal LM)."""

    auto_class = "AutoModelForCausalLM"
    head = ModelHead.CAUSAL_LM
    forward_fn = staticmethod(batch_logprobs)
    span_name = "reference.logprobs"

    def logprobs(self, batch: dict) -> torch.Tensor:
        """Per-token log-probs [B, T] of ``batch["input_ids"]`` (position 0 gets 0), on host.

        Needs ``input_ids`` and ``attention_mask``; computed ``micro_batch_size`` rows at a time,
        or packed (``max_tokens_per_micro_batch``), positions past a row's length then 0.
        """
        return self.forward_batch(batch)


def reference_role(
    model: str,
    *,
    micro_batch_size: int = 16,
    max_tokens_per_micro_batch: int | None = None,
    phases: frozenset[Phase] = frozenset({Phase.SCORE}),
    bundles: tuple[int, ...] | None = None,
    gpu_fraction: float = 0.1,
) -> Role:
    """The reference policy as a :class:`~colocate.roles.base.Role` named ``"reference"``."""
    config = ReferenceConfig(model, micro_batch_size, max_tokens_per_micro_batch)
    return Role("reference", ReferenceActor, config, phases, bundles, gpu_fraction)
