"""Colocated RL: a DeepSpeed trainer and vLLM engines sharing GPUs under one coordinator.

Public API::

    from colocate import Coordinator, EngineConfig, TrainerConfig, Sampling, SyncConfig
    from placement import TopologySpec

    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    with Coordinator(spec, EngineConfig(model=path), TrainerConfig(model=path), grpo_loss) as c:
        completions = c.generate(prompts, Sampling(n=8, max_tokens=12))
        c.train(make_grpo_batch(completions, rewards, 8, pad_id))
        c.sync()

Names are imported from their modules on first use: the actors' own modules (and the CUDA
device checks) then load without Ray, vLLM or DeepSpeed. The contract every actor the
coordinator drives answers to is ``colocate.contract``; the protocol is the hand-over table in
``colocate.handovers``. Extra tenants (reference policy, reward model, a user's actor) are
``colocate.roles.Role`` s passed as ``Coordinator(..., roles=[...])``.
"""

import importlib

_WHERE = {
    "ConfigError": "colocate.config",
    "DType": "colocate.config",
    "EngineConfig": "colocate.config",
    "LoadFormat": "colocate.config",
    "Pipeline": "colocate.config",
    "PipelineConfig": "colocate.config",
    "Sampling": "colocate.config",
    "SyncConfig": "colocate.config",
    "TrainerConfig": "colocate.config",
    "ZeroStage": "colocate.config",
    "Coordinator": "colocate.coordinator",
    "Timeouts": "colocate.coordinator",
    "SyncReport": "colocate.syncing",
    "Completion": "colocate.contract",
    "EngineTenant": "colocate.contract",
    "Tenant": "colocate.contract",
    "TrainerTenant": "colocate.contract",
    "EngineActor": "colocate.engine",
    "EngineCapabilities": "colocate.contract",
    "PromptTooLongError": "colocate.engine",
    "ActorFailedError": "colocate.errors",
    "ActorTimeoutError": "colocate.errors",
    "ActorNotDeadError": "colocate.errors",
    "ActorStateError": "colocate.errors",
    "EngineRpcTimeoutError": "colocate.errors",
    "ColocateError": "colocate.errors",
    "InputError": "colocate.errors",
    "Fault": "colocate.faults",
    "ActorId": "colocate.handovers",
    "grpo_loss": "colocate.losses",
    "lm_loss": "colocate.losses",
    "make_grpo_batch": "colocate.losses",
    "token_logprobs": "colocate.losses",
    "Phase": "colocate.phases",
    "Rollout": "colocate.rollouts",
    "StalenessError": "colocate.rollouts",
    "PhaseError": "colocate.phases",
    "Span": "colocate.timeline",
    "Timeline": "colocate.timeline",
    "Family": "colocate.tiny_model",
    "TinyModelSpec": "colocate.tiny_model",
    "build_tiny_model": "colocate.tiny_model",
    "TrainerActor": "colocate.trainer",
    "RoleTenant": "colocate.contract",
    "RoleMemory": "colocate.phases",
    "Role": "colocate.roles",
    "RoleActor": "colocate.roles",
    "RoleFootprint": "colocate.memory_plan",
    "RoleKind": "colocate.memory_plan",
    "ReferenceActor": "colocate.reference",
    "ReferenceConfig": "colocate.reference",
    "reference_role": "colocate.reference",
    "RewardModelActor": "colocate.reward_model",
    "RewardModelConfig": "colocate.reward_model",
    "reward_model_role": "colocate.reward_model",
    "init_reward_model": "colocate.reward_model",
    "fit_reward_model": "colocate.reward_model",
    "CriticActor": "colocate.critic",
    "CriticConfig": "colocate.critic",
    "critic_role": "colocate.critic",
    "ppo_advantages": "colocate.ppo",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'colocate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
