"""Colocated RL: a DeepSpeed trainer and vLLM engines sharing GPUs under one coordinator.

Public API::

    from colocate import Coordinator, EngineConfig, TrainerConfig, Sampling, SyncConfig
    from placement import TopologySpec

    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    with Coordinator(spec, EngineConfig(model=path), TrainerConfig(model=path), grpo_loss) as c:
        completions = c.generate(prompts, Sampling(n=8, max_tokens=12))
        c.train(make_grpo_batch(completions, rewards, 8, pad_id))
        c.sync()
"""

from colocate.config import (
    ConfigError,
    DType,
    EngineConfig,
    LoadFormat,
    Sampling,
    SyncConfig,
    TrainerConfig,
    ZeroStage,
)
from colocate.coordinator import Coordinator, SyncReport, Timeouts
from colocate.engine import Completion, EngineActor, EngineCapabilities, PromptTooLongError
from colocate.errors import ActorFailedError, ActorTimeoutError, ColocateError
from colocate.losses import grpo_loss, lm_loss, make_grpo_batch, token_logprobs
from colocate.phases import Phase, PhaseError
from colocate.timeline import Span, Timeline
from colocate.tiny_model import TinyModelSpec, build_tiny_model
from colocate.trainer import TrainerActor

__all__ = [
    "ActorFailedError",
    "ActorTimeoutError",
    "ColocateError",
    "Completion",
    "ConfigError",
    "Coordinator",
    "DType",
    "EngineActor",
    "EngineCapabilities",
    "EngineConfig",
    "LoadFormat",
    "Phase",
    "PhaseError",
    "PromptTooLongError",
    "Sampling",
    "Span",
    "SyncConfig",
    "SyncReport",
    "Timeline",
    "Timeouts",
    "TinyModelSpec",
    "TrainerActor",
    "TrainerConfig",
    "ZeroStage",
    "build_tiny_model",
    "grpo_loss",
    "lm_loss",
    "make_grpo_batch",
    "token_logprobs",
]
