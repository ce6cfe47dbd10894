"""A run's whole configuration, frozen, with every cross-field check done at construction.

The parts (topology, engine, trainer, sync, pipeline, roles) check themselves; this module
checks how they fit together, before any actor (or reservation) exists. Messages name the
field, the value and the fix.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from colocate.actors.engine import EngineActor
from colocate.actors.trainer import TrainerActor
from colocate.core.config import (
    ConfigError,
    EngineConfig,
    Pipeline,
    PipelineConfig,
    SyncConfig,
    TrainerConfig,
    check_engine_model,
)
from colocate.core.contract import EngineTenant, TrainerTenant
from colocate.core.handovers import Context
from colocate.roles.base import Role, attach_roles
from placement import TopologySpec

__all__ = ["RunConfig", "SleepLevel", "Timeouts"]


class SleepLevel(enum.IntEnum):
    """How deep an engine sleeps on a shared GPU while the trainer holds it."""

    #: The KV cache is freed; a host copy of the weights survives (``skip_sync`` is possible).
    KEEP_WEIGHTS = 1
    #: KV cache and weights are dropped (the weights always come back with the next sync).
    DROP_WEIGHTS = 2


@dataclass(frozen=True)
class Timeouts:
    """Bounds on actor work, in seconds.

    Attributes:
        start_s: Creating actors (first use of DeepSpeed compiles its CPU ops: minutes).
        step_s: One transition, generate call, train step or sync.
        ping_s: Health check of every actor during recovery.
        kill_s: Confirming a killed actor dead (Ray reports it DEAD and its process is gone)
            before anything replaces it.
    """

    start_s: float = 600.0
    step_s: float = 300.0
    ping_s: float = 10.0
    kill_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("start_s", "step_s", "ping_s", "kill_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and 0 < value < 1e6)
            ):
                raise ConfigError(
                    f"Timeouts.{name}={value!r}: must be a number in (0, 1e6) seconds; "
                    "fix: pass e.g. 300"
                )


@dataclass(frozen=True)
class RunConfig:
    """Everything a :class:`~colocate.core.coordinator.Coordinator` runs with.

    Attributes:
        spec: Which GPUs the trainer ranks, engines and roles use (the roles' placements are
            attached here: ``spec.roles`` comes from ``roles``).
        engine: Engine configuration (shared by all engines).
        trainer: Trainer configuration (shared by all ranks).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``, a module-level function.
        sync: Weight-transfer settings.
        sleep_level: How deep engines sleep on shared GPUs (an int 1 or 2 is accepted).
        timeouts: Bounds on actor work.
        engine_cls: The engine actor class, an :class:`~colocate.core.contract.EngineTenant`.
        trainer_cls: The trainer actor class, a :class:`~colocate.core.contract.TrainerTenant`
            (subclass :class:`~colocate.actors.trainer.TrainerActor` and keep its constructor).
        name: Prefix of actor, placement-group and rendezvous names (unique by default).
        probe: The placement probe run on each bundle (default ``placement.probe_bundle``).
        pipeline: SYNC (default), ASYNC one-step off-policy rollouts (separate pools only), or
            PARTIAL rollouts (groups in flight across the hand-over; shared GPUs too).
        check_memory: Plan every phase's memory on the reserved bundles and refuse, before any
            actor starts, a run that cannot fit.
        roles: Extra tenants (:class:`~colocate.roles.base.Role`), placed beside the trainer
            ranks unless they name their own bundles.

    Raises:
        ConfigError: Parts that do not fit together (or a part of the wrong type).
        TopologyError: A role's placement is invalid.
    """

    spec: TopologySpec
    engine: EngineConfig
    trainer: TrainerConfig
    loss_fn: Callable
    sync: SyncConfig = field(default_factory=SyncConfig)
    sleep_level: SleepLevel = SleepLevel.KEEP_WEIGHTS
    timeouts: Timeouts = field(default_factory=Timeouts)
    engine_cls: type[EngineTenant] = EngineActor
    trainer_cls: type[TrainerTenant] = TrainerActor
    name: str = ""
    probe: Any = None
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    check_memory: bool = True
    roles: tuple[Role, ...] = ()

    @classmethod
    def of(cls, spec, engine, trainer, loss_fn, **options) -> RunConfig:
        """Builds one from the coordinator's arguments; ``None`` options take the defaults.

        Raises:
            ConfigError: An option that is not a field (named, with the list of fields).
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(
                f"Coordinator({unknown[0]}=...): not an option; fix: use one of "
                f"{sorted(names - {'spec', 'engine', 'trainer', 'loss_fn'})}"
            )
        given = {k: v for k, v in options.items() if v is not None}
        return cls(spec, engine, trainer, loss_fn, **given)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are set once, here
        for label, value, kind in (
            ("spec", self.spec, TopologySpec),
            ("engine", self.engine, EngineConfig),
            ("trainer", self.trainer, TrainerConfig),
            ("sync", self.sync, SyncConfig),
            ("timeouts", self.timeouts, Timeouts),
            ("pipeline", self.pipeline, PipelineConfig),
        ):
            if not isinstance(value, kind):
                raise ConfigError(
                    f"{label}={value!r}: must be a {kind.__name__}; fix: pass {kind.__name__}(...)"
                )
        level = self.sleep_level
        if isinstance(level, bool) or level not in (1, 2):
            raise ConfigError(f"sleep_level={level!r}: must be 1 or 2; fix: pass 1 or 2")
        put(self, "sleep_level", SleepLevel(level))
        put(self, "name", self.name or f"colocate-{uuid.uuid4().hex[:8]}")
        put(self, "roles", tuple(self.roles))
        self._check_fit()
        # Every role checked here (type, placement, config against the policy's model).
        put(self, "spec", attach_roles(self.spec, self.roles, self.trainer.model))
        check_engine_model(self.engine)  # the device-specific checks run once it is known

    def _check_fit(self) -> None:
        spec, engine, trainer, pipeline = self.spec, self.engine, self.trainer, self.pipeline
        if self.roles and pipeline.mode is Pipeline.ASYNC:
            raise ConfigError(
                "Coordinator(roles=...) with PipelineConfig.mode='async': roles are ordered by "
                "the synchronous loop's phases only; fix: mode='sync'"
            )
        if pipeline.mode is Pipeline.ASYNC and spec.colocate:
            raise ConfigError(
                "PipelineConfig.mode='async' overlaps rollouts with training, which needs the "
                "trainer and the engines on different GPUs, but TopologySpec.colocate=True puts "
                "them on the same ones; fix: TopologySpec(colocate=False) with GPUs for both "
                "pools, or mode='sync'"
            )
        if engine.tensor_parallel_size != spec.engine_tp:
            raise ConfigError(
                f"EngineConfig.tensor_parallel_size={engine.tensor_parallel_size} but "
                f"TopologySpec.engine_tp={spec.engine_tp}; fix: make them equal"
            )
        if not callable(self.loss_fn):
            raise ConfigError(
                f"loss_fn={self.loss_fn!r}: must be callable as loss_fn(model, batch)"
            )
        for label, cls, base in (
            ("engine_cls", self.engine_cls, EngineTenant),
            ("trainer_cls", self.trainer_cls, TrainerTenant),
        ):
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ConfigError(
                    f"{label}={cls!r}: must subclass colocate.contract.{base.__name__}; fix: "
                    f"subclass {'EngineActor' if base is EngineTenant else 'TrainerActor'}"
                )
        if not trainer.deepspeed and spec.trainer_world_size != 1:
            raise ConfigError(
                f"TrainerConfig.deepspeed=False needs trainer_world_size=1, got "
                f"{spec.trainer_world_size}; fix: use DeepSpeed or one trainer rank"
            )
        self._check_budgets()

    def _check_budgets(self) -> None:
        """Refuses a token budget that a sequence at ``max_model_len`` would not fit in.

        A packed micro-batch holds whole sequences; a budget above ``max_model_len`` packs
        several. Checked: the policy trainer's, and every role's
        (``RoleActor.token_budget`` of its config).
        """
        longest = self.engine.max_model_len
        budgets = [
            ("TrainerConfig.max_tokens_per_micro_batch", self.trainer.max_tokens_per_micro_batch)
        ]
        for role in self.roles:
            field = role.actor.token_budget_field
            label = f"(role {role.name!r}) {type(role.config).__name__}.{field}"
            budgets.append((label, role.actor.token_budget(role.config)))
        for label, budget in budgets:
            if budget is not None and budget < longest:
                raise ConfigError(
                    f"{label}={budget} < EngineConfig.max_model_len={longest}: a sequence at "
                    "the maximum length (prompt + completion) would not fit in one packed "
                    f"micro-batch; fix: max_tokens_per_micro_batch >= {longest} (a larger "
                    "budget packs several sequences), or a smaller max_model_len"
                )

    @property
    def collective_timeout_s(self) -> float:
        """Bound on a tenant group's collectives (trainer ranks, a role's ranks).

        A group's collective may wait behind a whole transfer on a slow peer: five transfer
        timeouts.
        """
        return self.sync.timeout_s * 5

    @property
    def role_map(self) -> dict[str, Role]:
        """The roles by name."""
        return {r.name: r for r in self.roles}

    def context(self, **values) -> Context:
        """The hand-over context of this run, with ``values`` (a row's own) filled in."""
        return Context(
            sleep_level=self.sleep_level,
            collective_timeout_s=self.collective_timeout_s,
            role_phases=tuple((r.name, r.phases) for r in self.roles),
            **values,
        )
