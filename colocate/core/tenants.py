"""Tenant groups: every model on the GPUs described one way, with its declared capabilities.

The engines, the policy's trainer ranks and each role (reference, reward model, critic, a
user's own) are one :class:`TenantGroup` each: a name, the actor class and its config, its
ranks and their GPUs, the phases it is resident in, and the capabilities its actor class
declares on the contract (``colocate.core.contract.Tenant``: ``collective``, ``stateful``,
``trainable``). Group set-up, save, resume and recovery iterate the groups by capability.
Pure; no Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colocate.core.contract import Tenant
from colocate.core.handovers import ActorId, actors_of, lanes_of
from colocate.core.phases import Phase
from colocate.core.run_config import RunConfig
from placement import Plan, TenantKind

__all__ = ["TenantGroup", "group_name", "tenant_groups"]


@dataclass(frozen=True)
class TenantGroup:
    """One group of tenants of a run.

    Attributes:
        name: ``"engine"``, ``"trainer"``, or the role's name.
        kind: Which kind of actor its ranks are (the hand-over table's rows name kinds).
        actor_cls: The actor class of every rank.
        config: What every rank is built from.
        ranks: Its actors, in rank order.
        bundles: Each rank's GPUs (bundle indices; an engine's TP workers in TP-rank order).
        gpu_share: Ray ``num_gpus`` of each rank (each TP worker, for an engine).
        phases: The phases it is resident in on a shared GPU.
        collective: Its ranks form a torch.distributed group of their own (rank 0 hosts the
            store before they start; losing one rank loses the group).
        stateful: It holds trained state a checkpoint must carry.
        trainable: It takes optimizer steps.
        loss_fn: What its ranks train with, if the run supplies it (the policy's loss).
    """

    name: str
    kind: TenantKind
    actor_cls: type[Tenant]
    config: Any
    ranks: tuple[ActorId, ...]
    bundles: tuple[tuple[int, ...], ...]
    gpu_share: float
    phases: frozenset[Phase]
    collective: bool
    stateful: bool
    trainable: bool
    loss_fn: Callable | None = None

    def checkpoint_dir(self, root: str) -> str:
        """Where this group's state lives in a checkpoint written under ``root``.

        The policy's trainer writes ``root`` itself (its layout is DeepSpeed's); every other
        stateful group writes ``root/<name>``.
        """
        return root if self.kind is TenantKind.TRAINER else str(Path(root) / self.name)


def group_name(actor: ActorId) -> str:
    """The name of ``actor``'s group."""
    return actor.role if actor.kind is TenantKind.ROLE else actor.kind.value


def tenant_groups(config: RunConfig, plan: Plan) -> tuple[TenantGroup, ...]:
    """Every tenant group of a run: the engines, the trainer ranks, then each role."""
    spec = config.spec

    def group(name, kind, cls, cfg, ranks, share, phases, loss_fn=None) -> TenantGroup:
        return TenantGroup(
            name,
            kind,
            cls,
            cfg,
            tuple(ranks),
            tuple(lanes_of(plan, a) for a in ranks),
            share,
            frozenset(phases),
            cls.collective,
            cls.stateful,
            cls.trainable,
            loss_fn,
        )

    groups = [
        group(
            "engine",
            TenantKind.ENGINE,
            config.engine_cls,
            config.engine,
            actors_of(plan, TenantKind.ENGINE),
            spec.engine_fraction,
            {Phase.ROLLOUT},
        ),
        group(
            "trainer",
            TenantKind.TRAINER,
            config.trainer_cls,
            config.trainer,
            actors_of(plan, TenantKind.TRAINER),
            spec.trainer_fraction,
            {Phase.TRAIN},
            config.loss_fn,
        ),
    ]
    roles = actors_of(plan, TenantKind.ROLE)
    for r in config.roles:
        ranks = [a for a in roles if a.role == r.name]
        groups.append(
            group(r.name, TenantKind.ROLE, r.actor, r.config, ranks, r.gpu_fraction, r.phases)
        )
    return tuple(groups)
