"""From a recipe to the library's configs: the topology, engine, trainer, sync, pipeline, roles.

:func:`resolve_model` finds the policy's directory (``tiny`` builds the tiny Llama);
:func:`library_configs` constructs every config the coordinator takes (pure: it starts nothing),
and a refusal of the library's own checks (``ConfigError``, ``TopologyError``) comes back as a
:class:`~colocate.runner.schema.RecipeError` naming the recipe key the field came from;
:func:`memory_plan` plans the run's memory as the coordinator's pre-launch check does, without
Ray; :func:`loss_function` is the policy loss the recipe asks for.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colocate.agents.config import AgentConfig
from colocate.algorithms.advantages import Estimator
from colocate.algorithms.losses import LossAgg
from colocate.core.config import (
    ConfigError,
    DType,
    EngineConfig,
    Pipeline,
    PipelineConfig,
    Sampling,
    SyncConfig,
    TrainerConfig,
)
from colocate.runner.schema import TINY_MODEL, ModelSection, RecipeError, RunnerConfig
from placement import DeviceKind, TopologyError, TopologySpec

if TYPE_CHECKING:
    from colocate.operations.memory_plan import MemoryPlan
    from colocate.roles.base import Role
    from placement import Plan

__all__ = [
    "LibraryConfigs",
    "resolve_model",
    "library_configs",
    "check_run",
    "memory_plan",
    "loss_function",
]

#: The loss aggregations whose per-sequence means weigh micro-batches by sequences: the batch
#: carries a per-token field that counts each sequence once (1 at its first completion token).
SEQUENCE_MEAN = (
    LossAgg.SEQ_MEAN_TOKEN_MEAN,
    LossAgg.SEQ_MEAN_TOKEN_SUM,
    LossAgg.SEQ_MEAN_TOKEN_SUM_NORM,
)
#: The estimators whose KL to the reference is a loss term (the others put it in the reward).
KL_IN_LOSS = (Estimator.GRPO, Estimator.DR_GRPO, Estimator.RLOO)


@dataclass(frozen=True)
class LibraryConfigs:
    """Everything the coordinator takes, built from one recipe.

    Attributes:
        model: The policy's local directory (resolved).
        spec: GPUs of the trainer ranks and the engines (the roles' placements are attached
            by the coordinator).
        engine: The vLLM engines' config.
        trainer: The policy trainer's config.
        sync: The weight transfer's config.
        pipeline: How rollouts and training follow each other.
        sampling: Sampling of the training rollouts.
        sleep_level: vLLM sleep level of the engines while the trainer trains.
        roles: The reference (``algorithm.kl_coef > 0``), the reward model (``reward.model``)
            and the critic (``algorithm.estimator=gae``), in that order.
        agent: The agent loop (``agent.env``; None: single-turn rollouts).
    """

    model: str
    spec: TopologySpec
    engine: EngineConfig
    trainer: TrainerConfig
    sync: SyncConfig
    pipeline: PipelineConfig
    sampling: Sampling
    sleep_level: int
    roles: list[Role]
    agent: AgentConfig | None = None

    def coordinator_args(self, loss_fn: Callable) -> tuple[tuple, dict]:
        """``(args, options)`` of ``Coordinator(*args, **options)`` and ``RunConfig.of``."""
        args = (self.spec, self.engine, self.trainer, loss_fn)
        options = {
            "sync": self.sync,
            "sleep_level": self.sleep_level,
            "pipeline": self.pipeline,
            "roles": self.roles,
        }
        return args, options


def resolve_model(section: ModelSection) -> str:
    """The policy's local directory: ``tiny`` builds the tiny Llama (cached), else a checked dir.

    Nothing is downloaded.

    Raises:
        RecipeError: ``model.path`` is not a directory, or holds no ``config.json``.
    """
    if section.path == TINY_MODEL:
        from colocate.testing.tiny_model import build_tiny_model

        return str(build_tiny_model())
    path = Path(section.path).expanduser()
    fix = f"pass a local HF model directory (nothing is downloaded), or model.path={TINY_MODEL}"
    if not path.is_dir():
        problem = "does not exist" if not path.exists() else "is not a directory"
        raise RecipeError("model.path", section.path, problem, fix)
    if not (path / "config.json").is_file():
        raise RecipeError("model.path", section.path, "holds no config.json", fix)
    # absolute: the actors need not share the driver's working directory
    return str(path.resolve())


# Library field -> recipe key, per config (the library's messages name ``Owner.field``).
_ENGINE_KEYS = {
    "model": "model.path",
    "tensor_parallel_size": "cluster.tp",
    "max_model_len": "rollout.max_model_len",
    "seed": "seed",
    "log_level": "log.vllm_log_level",
}
_TRAINER_KEYS = {
    "model": "model.path",
    "lr": "trainer.lr",
    "zero_stage": "trainer.zero_stage",
    "dtype": "trainer.dtype",
    "grad_clip": "trainer.grad_clip",
    "weight_decay": "trainer.weight_decay",
    "seed": "seed",
    "micro_batch_size": "trainer.micro_batch_size",
    "max_tokens_per_micro_batch": "trainer.max_tokens_per_micro_batch",
    "mini_batches": "trainer.mini_batches",
    "epochs": "trainer.epochs",
    "activation_checkpointing": "trainer.activation_checkpointing",
}
_CRITIC_KEYS = _TRAINER_KEYS | {"lr": "algorithm.critic_lr"}
_SYNC_KEYS = {"bucket_bytes": "trainer.sync_bucket_mb"}
_PIPELINE_KEYS = {
    "mode": "rollout.pipeline",
    "max_staleness": "rollout.max_staleness",
    "in_flight_groups": "rollout.in_flight_groups",
    "staleness_policy": "rollout.staleness_policy",
}
_SAMPLING_KEYS = {
    "n": "rollout.group_size",
    "max_tokens": "rollout.max_tokens",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
}
_AGENT_KEYS = {
    f"AgentConfig.{name}": f"agent.{name}"
    for name in (
        "env",
        "env_kwargs",
        "max_turns",
        "turn_tokens",
        "max_context",
        "step_timeout_s",
        "step_workers",
        "observation",
    )
}
_FROZEN_KEYS = {"max_tokens_per_micro_batch": "trainer.max_tokens_per_micro_batch"}
_ROLE_CHECK_KEYS = {
    "ReferenceConfig.model": "model.path",
    "RewardModelConfig.model": "reward.model",
    "CriticConfig.trainer.model": "model.path",
    "TrainerConfig.model": "model.path",
    "max_tokens_per_micro_batch": "trainer.max_tokens_per_micro_batch",
}


def _spec_keys(separate: bool) -> dict[str, str]:
    if separate:
        return {
            "trainer_world_size": "cluster.trainer_gpus",
            # one node holds both pools
            "gpus_per_node": "cluster.trainer_gpus+cluster.engine_gpus",
            "engines": "cluster.engines",
            "engine_tp": "cluster.tp",
        }
    return {
        "trainer_world_size": "cluster.gpus",
        "gpus_per_node": "cluster.gpus",
        "engines": "cluster.engines",
        "engine_tp": "cluster.tp",
    }


def _recipe_value(config: RunnerConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


class _Shown(str):
    """A value shown as the library wrote it (already a repr)."""

    def __repr__(self) -> str:
        return str(self)


def _rename(text: str, keys: dict[str, str]) -> str:
    """The library's field names in ``text`` as recipe keys.

    A field is renamed where it is assigned (``engines=2``) or, for a snake_case name, wherever
    it stands alone; plain words (``model``, ``seed``) stay prose elsewhere.
    """
    for field, key in sorted(keys.items(), key=lambda kv: -len(kv[0])):
        name = field.rpartition(".")[2]
        if "." in field:  # a qualified label: renamed whole
            text = text.replace(f"{field}=", f"{key}=")
            continue
        tail = r"\b" if "_" in name else r"(?==)"
        text = re.sub(rf"(?<![\w.]){re.escape(name)}{tail}", key, text)
    return text


def _to_recipe_error(
    config: RunnerConfig, message: str, keys: dict[str, str], default: str
) -> RecipeError:
    """A library refusal as a :class:`RecipeError` on the recipe key of its field."""
    found = None
    for field, key in keys.items():
        label = field if "." in field else f".{field}"
        at = message.find(f"{label}=")
        if at >= 0 and (found is None or at < found[0]):
            found = (at, field, key)
    key = found[2] if found else default
    problem, _, fix = message.partition("; fix: ")
    value: Any = _recipe_value(config, key)
    # "Owner.field=value: problem": the library's value where the recipe left the key unset
    head = re.match(r"^\s*[\w().' ]+?\.(\w+)=(.+?): (.*)$", problem, re.S)
    if head and found and head.group(1) == found[1].rpartition(".")[2]:
        if value is None:
            value = _Shown(head.group(2))
        problem = head.group(3)
    return RecipeError(
        key,
        value,
        _rename(problem, keys),
        _rename(fix, keys) if fix else "see the message",
    )


@contextmanager
def _recipe_keys(config: RunnerConfig, keys: dict[str, str], default: str) -> Iterator[None]:
    """Re-raises the library's ConfigError/TopologyError as a RecipeError on a recipe key."""
    try:
        yield
    except (ConfigError, TopologyError) as exc:
        raise _to_recipe_error(config, str(exc), keys, default) from exc


def _check_engine_pool(engines: int, tp: int, engine_gpus: int, given: bool) -> None:
    """Separate pools: the engines' TP workers fill the engine pool, one per GPU.

    The topology's own check sums both pools; this one names the engine pool's keys.
    """
    if engines * tp == engine_gpus:
        return
    problem = (
        f"cluster.engines x cluster.tp = {engines} x {tp} = {engines * tp}, but the engine pool "
        f"has cluster.engine_gpus={engine_gpus} (one engine worker per GPU)"
    )
    if given:
        fix = f"pass cluster.engines={engine_gpus // tp}" if engine_gpus % tp == 0 else ""
        fix = fix or f"pass a cluster.tp that divides {engine_gpus}"
        raise RecipeError("cluster.engines", engines, problem, fix + ", or drop cluster.engines")
    raise RecipeError("cluster.tp", tp, problem, f"pass a cluster.tp that divides {engine_gpus}")


def library_configs(config: RunnerConfig, model: str) -> LibraryConfigs:
    """The coordinator's configs for ``config``. Pure: constructs, starts nothing.

    Args:
        config: The recipe (from :func:`~colocate.runner.recipe.load_recipe`).
        model: The policy's local directory (:func:`resolve_model`).

    Raises:
        RecipeError: A config the library refuses, on the recipe key its field came from.
    """
    from colocate.roles.critic import CriticConfig, critic_role
    from colocate.roles.reference import reference_role
    from colocate.roles.reward_model import reward_model_role

    cluster, rollout, train, alg = config.cluster, config.rollout, config.trainer, config.algorithm
    with _recipe_keys(config, _spec_keys(cluster.separate), "cluster"):
        if cluster.separate:
            engine_gpus = cluster.engine_gpus
            engines = cluster.engines or max(1, engine_gpus // cluster.tp)
            _check_engine_pool(engines, cluster.tp, engine_gpus, cluster.engines is not None)
            spec = TopologySpec(
                nodes=1,
                gpus_per_node=cluster.trainer_gpus + engine_gpus,
                trainer_world_size=cluster.trainer_gpus,
                engines=engines,
                engine_tp=cluster.tp,
                colocate=False,
            )
        else:
            spec = TopologySpec(
                nodes=1,
                gpus_per_node=cluster.gpus,
                trainer_world_size=cluster.gpus,
                engines=cluster.engines or max(1, cluster.gpus // cluster.tp),
                engine_tp=cluster.tp,
            )
    with _recipe_keys(config, _ENGINE_KEYS, "rollout"):
        engine = EngineConfig(
            model=model,
            tensor_parallel_size=cluster.tp,
            seed=config.seed,
            log_level=config.log.vllm_log_level,
            max_model_len=rollout.max_model_len,
        )
    budget = train.max_tokens_per_micro_batch
    # What the policy's and the critic's optimizers share.
    common = {
        "zero_stage": train.zero_stage,
        "dtype": DType(train.dtype),
        "seed": config.seed,
        "micro_batch_size": train.micro_batch_size,
        "max_tokens_per_micro_batch": budget,
        "activation_checkpointing": train.activation_checkpointing,
    }
    with _recipe_keys(config, _TRAINER_KEYS, "trainer"):
        seq_mean = {"loss_tokens": "sequence_starts"} if alg.loss_agg in SEQUENCE_MEAN else {}
        trainer = TrainerConfig(
            model=model,
            lr=train.lr,
            grad_clip=train.grad_clip,
            weight_decay=train.weight_decay,
            mini_batches=train.mini_batches,
            epochs=train.epochs,
            **common,
            **seq_mean,
        )
    with _recipe_keys(config, _SYNC_KEYS, "trainer.sync_bucket_mb"):
        mb = train.sync_bucket_mb
        sync = SyncConfig(bucket_bytes=int(mb * 2**20) if mb is not None else None)
    with _recipe_keys(config, _PIPELINE_KEYS, "rollout.pipeline"):
        mode = rollout.pipeline
        pipeline = PipelineConfig(
            mode=mode,
            # async: one step behind (one-step off-policy); partial: steps within a completion
            max_staleness=1 if mode is Pipeline.ASYNC else rollout.max_staleness,
            in_flight_groups=(rollout.in_flight_groups or 2 * rollout.prompts)
            if mode is Pipeline.PARTIAL
            else None,
            staleness_policy=rollout.staleness_policy,
        )
    with _recipe_keys(config, _SAMPLING_KEYS, "rollout"):
        sampling = Sampling(
            n=rollout.group_size,
            max_tokens=rollout.max_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
        )
    roles = []
    with _recipe_keys(config, _FROZEN_KEYS, "algorithm.kl_coef"):
        if alg.kl_coef > 0:  # the reference packs like the trainer
            roles.append(reference_role(model, max_tokens_per_micro_batch=budget))
    with _recipe_keys(config, _FROZEN_KEYS, "reward.model"):
        if config.reward.model:
            roles.append(reward_model_role(config.reward.model, max_tokens_per_micro_batch=budget))
    with _recipe_keys(config, _CRITIC_KEYS, "algorithm.estimator"):
        if alg.estimator is Estimator.GAE:
            critic = TrainerConfig(model=model, lr=alg.critic_lr, **common)
            roles.append(critic_role(CriticConfig(critic)))
    agent = None
    if config.agent.env is not None:
        with _recipe_keys(config, _AGENT_KEYS, "agent.env"):
            a = config.agent
            agent = AgentConfig(
                env=a.env,
                env_kwargs=dict(a.env_kwargs),
                max_turns=a.max_turns,
                turn_tokens=a.turn_tokens,
                max_context=a.max_context,
                step_timeout_s=a.step_timeout_s,
                step_workers=a.step_workers,
                observation=a.observation,
                path=(str(Path.cwd()),),  # a module beside the recipe, as for reward functions
            )
    return LibraryConfigs(
        agent=agent,
        model=model,
        spec=spec,
        engine=engine,
        trainer=trainer,
        sync=sync,
        pipeline=pipeline,
        sampling=sampling,
        sleep_level=cluster.sleep_level,
        roles=roles,
    )


def check_run(config: RunnerConfig, configs: LibraryConfigs) -> None:
    """The coordinator's own cross-checks of the configs, in the driver, before Ray starts.

    ``RunConfig.of`` as ``Coordinator(...)`` calls it: the roles attached (each role's model
    checked against the policy's), the engine's model checked for this machine's attention
    backend, the pipeline and the token budgets checked together.

    Raises:
        RecipeError: On the recipe key of the field the library refused.
    """
    from colocate.core.run_config import RunConfig

    keys = _ROLE_CHECK_KEYS | _ENGINE_KEYS | _PIPELINE_KEYS | _FROZEN_KEYS
    with _recipe_keys(config, keys, "model.path"):
        args, options = configs.coordinator_args(loss_function(config))
        RunConfig.of(*args, **options)


def memory_plan(
    config: RunnerConfig, configs: LibraryConfigs, device: DeviceKind
) -> tuple[MemoryPlan, Plan]:
    """The run's memory plan, as the coordinator's pre-launch check makes it, without Ray.

    Steps: (1) the roles attached to the topology (each role's model checked against the
    policy's); (2) the placement plan; (3) ``settings_for`` and ``role_loads``; (4)
    ``plan_memory`` of the policy's shape (the engines' KV cache is their configured size).

    Args:
        config: The recipe (for the keys of refusals).
        configs: Its library configs (:func:`library_configs`).
        device: Plan for CUDA GPUs, or for a CPU run against host memory.

    Returns:
        The memory plan, and the placement plan it was made on (its bundles' pools and roles).

    Raises:
        RecipeError: A role's model the library refuses (``reward.model``, ``model.path``).
    """
    from colocate.operations.memory_check import role_loads, settings_for
    from colocate.operations.memory_plan import model_shape, plan_memory
    from colocate.roles.base import attach_roles
    from placement import plan

    with _recipe_keys(config, _ROLE_CHECK_KEYS, "cluster"):
        spec = attach_roles(configs.spec, configs.roles, configs.model)
        placed = plan(spec)
    settings = settings_for(
        configs.engine, configs.trainer, configs.sync, placed, device, configs.sleep_level
    )
    loads = role_loads(configs.roles, placed)
    return plan_memory(model_shape(configs.model), settings, None, loads), placed


def loss_function(config: RunnerConfig) -> Callable:
    """The policy loss of the recipe: ``policy_loss`` with the algorithm's settings bound.

    The KL to the reference is a loss term for grpo, dr_grpo and rloo only (reinforce_pp and
    gae put it in the reward); ``norm_tokens`` is ``rollout.max_tokens`` (Dr. GRPO's
    ``seq-mean-token-sum-norm``).
    """
    from colocate.algorithms.losses import policy_loss

    alg = config.algorithm
    return functools.partial(
        policy_loss,
        clip_low=alg.clip_low,
        clip_high=alg.clip_upper,
        loss_agg=alg.loss_agg,
        tis_cap=alg.tis_cap,
        kl_coef=alg.kl_coef if alg.estimator in KL_IN_LOSS else 0.0,
        norm_tokens=config.rollout.max_tokens,
    )
