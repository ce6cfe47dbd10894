"""The factory of trainer backends: the one module that knows every implementation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from colocate.actors.trainer_backend import TrainerBackend
from colocate.core.config import TrainerConfig

__all__ = ["make_backend"]


def make_backend(
    config: TrainerConfig,
    rank: int,
    world_size: int,
    model_factory: Callable[[], torch.nn.Module] | None = None,
) -> TrainerBackend:
    """DeepSpeed unless ``config.deepspeed`` is False (then plain torch, one rank)."""
    if config.deepspeed:
        from colocate.actors.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(config, rank, world_size, model_factory)
    from colocate.actors.torch_backend import TorchBackend

    return TorchBackend(config, rank, world_size, model_factory)
