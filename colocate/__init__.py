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
coordinator drives answers to is ``colocate.core.contract``; the protocol is the hand-over table in
``colocate.core.handovers``. Extra tenants (reference policy, reward model, a user's actor) are
``colocate.roles.base.Role`` s passed as ``Coordinator(..., roles=[...])``.
"""

import importlib

_WHERE = {
    "ConfigError": "colocate.core.config",
    "DType": "colocate.core.config",
    "EngineConfig": "colocate.core.config",
    "LoadFormat": "colocate.core.config",
    "Pipeline": "colocate.core.config",
    "StalenessPolicy": "colocate.core.config",
    "PipelineConfig": "colocate.core.config",
    "Sampling": "colocate.core.config",
    "SyncConfig": "colocate.core.config",
    "TrainerConfig": "colocate.core.config",
    "ZeroStage": "colocate.core.config",
    "Coordinator": "colocate.core.coordinator",
    "Timeouts": "colocate.core.run_config",
    "RunConfig": "colocate.core.run_config",
    "SleepLevel": "colocate.core.run_config",
    "SyncReport": "colocate.core.syncing",
    "Completion": "colocate.core.contract",
    "EngineTenant": "colocate.core.contract",
    "Tenant": "colocate.core.contract",
    "TrainerTenant": "colocate.core.contract",
    "EngineActor": "colocate.actors.engine",
    "EngineCapabilities": "colocate.core.contract",
    "PromptTooLongError": "colocate.actors.engine",
    "ActorFailedError": "colocate.core.errors",
    "ActorTimeoutError": "colocate.core.errors",
    "ActorNotDeadError": "colocate.core.errors",
    "ActorStateError": "colocate.core.errors",
    "EngineRpcTimeoutError": "colocate.core.errors",
    "ColocateError": "colocate.core.errors",
    "InputError": "colocate.core.errors",
    "Fault": "colocate.core.faults",
    "ActorId": "colocate.core.handovers",
    "grpo_loss": "colocate.algorithms.losses",
    "policy_loss": "colocate.algorithms.losses",
    "make_batch": "colocate.algorithms.losses",
    "lm_loss": "colocate.algorithms.losses",
    "make_grpo_batch": "colocate.algorithms.losses",
    "token_logprobs": "colocate.algorithms.losses",
    "batch_logprobs": "colocate.algorithms.losses",
    "SequencePackingError": "colocate.algorithms.packing",
    "Phase": "colocate.core.phases",
    "Rollout": "colocate.algorithms.rollouts",
    "StalenessError": "colocate.algorithms.rollouts",
    "PhaseError": "colocate.core.phases",
    "Span": "colocate.operations.timeline",
    "Timeline": "colocate.operations.timeline",
    "Family": "colocate.testing.tiny_model",
    "TinyModelSpec": "colocate.testing.tiny_model",
    "build_tiny_model": "colocate.testing.tiny_model",
    "TrainerActor": "colocate.actors.trainer",
    "RoleTenant": "colocate.core.contract",
    "RoleMemory": "colocate.core.phases",
    "Role": "colocate.roles.base",
    "RoleActor": "colocate.roles.base",
    "RoleFootprint": "colocate.operations.memory_plan",
    "RoleKind": "colocate.operations.memory_plan",
    "FrozenModelActor": "colocate.roles.frozen",
    "FrozenModelConfig": "colocate.roles.frozen",
    "ReferenceActor": "colocate.roles.reference",
    "ReferenceConfig": "colocate.roles.reference",
    "reference_role": "colocate.roles.reference",
    "RewardModelActor": "colocate.roles.reward_model",
    "RewardModelConfig": "colocate.roles.reward_model",
    "reward_model_role": "colocate.roles.reward_model",
    "init_reward_model": "colocate.roles.reward_model",
    "fit_reward_model": "colocate.roles.reward_model",
    "CriticActor": "colocate.roles.critic",
    "CriticConfig": "colocate.roles.critic",
    "critic_role": "colocate.roles.critic",
    "ppo_advantages": "colocate.algorithms.ppo",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'colocate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
