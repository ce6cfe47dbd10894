"""The coordinator's side of the roles' own verbs: checked, sharded, called, merged.

Everything else a role shares with every tenant group (group stores, save, load, restart) is
done by capability, one code path for all groups (``colocate.core.runtime``,
``colocate.core.lifecycle``). Ordering stays with the executor: a call that needs the
``score`` row gets it in the same driver round.
"""

from __future__ import annotations

from pathlib import Path

from colocate.algorithms.batches import batch_rows
from colocate.core.config import ConfigError
from colocate.core.executor import Executor
from colocate.core.fleet import Fleet
from colocate.core.handovers import SCORE, ActorId, actors_of
from colocate.core.phases import Phase, PhaseError
from colocate.core.run_config import RunConfig
from colocate.roles.base import merge_rows, split_rows, wants_max_rows
from placement import Plan, TenantKind

__all__ = ["RoleDriver"]


class RoleDriver:
    """The verbs of a pipeline's roles, and the check of their checkpoint directories.

    Args:
        config: The run's configuration (its roles, topology and collective bound).
        plan: The placement plan.
        fleet: The actors.
        executor: The coordinator's executor (rows and bounded waits).
    """

    def __init__(self, config: RunConfig, plan: Plan, fleet: Fleet, executor: Executor):
        self.roles = config.role_map
        self.plan = plan
        self.fleet = fleet
        self.exec = executor
        self.ctx = config.context

    def ranks(self, role: str) -> list[ActorId]:
        """The actors of ``role``, in rank order."""
        return [a for a in actors_of(self.plan, TenantKind.ROLE) if a.role == role]

    def call(self, role: str, verb, args: tuple, shard: bool):
        """Plans and runs one role call (see ``Coordinator.call_role``); raises on bad input."""
        if role not in self.roles:
            raise ConfigError(f"role={role!r} is not one of {sorted(self.roles)}; fix: pass one")
        cls = self.roles[role].actor
        name = getattr(verb, "__name__", None)
        if not callable(verb) or not name or getattr(cls, name, None) is not verb:
            raise TypeError(
                f"call_role({role!r}, {getattr(verb, '__qualname__', verb)!r}): not a method of "
                f"the role's class {cls.__qualname__}; fix: pass one of its methods, e.g. "
                f"{cls.__qualname__}.<verb>"
            )
        phases = self.roles[role].phases
        step = self.exec.step(self.fleet)
        if step.phase not in phases:
            if not (step.phase is Phase.ROLLOUT and Phase.SCORE in phases):
                raise PhaseError(
                    f"role {role!r} is resident in {sorted(p.value for p in phases)}, but the "
                    f"pipeline is in {step.phase.value!r}; fix: call it in one of those "
                    "phases (from rollout, a role resident in score is reached by this call)"
                )
            step.row(SCORE, self.ctx())
        ranks = self.ranks(role)
        if shard:
            if not args or not isinstance(args[0], dict):
                raise ValueError(
                    f"call_role({role!r}, shard=True) needs a batch dict as first argument; "
                    "fix: pass one, or shard=False"
                )
            budget = cls.token_budget(self.roles[role].config)
            parts, order = split_rows(args[0], len(ranks), by_tokens=budget is not None)
            # A verb that plans from the largest shard is told its rows (takes_max_rows).
            most = (max(batch_rows(p) for p in parts),) if wants_max_rows(verb) else ()
            per_rank = [(part, *most, *args[1:]) for part in parts]
        else:
            per_rank, order = [args] * len(ranks), None
        tag = self.exec.tag(step.phase.value)
        steps = [
            step.add(self.fleet.call(a, verb, *a_args, tag=tag))
            for a, a_args in zip(ranks, per_rank, strict=True)
        ]

        def run():
            results = step.run(f"call_role:{role}")
            answers = [results[i] for i in steps]
            return merge_rows(answers, order) if shard else answers

        return run

    def check_checkpoint(self, checkpoint: str) -> None:
        """Raises unless ``checkpoint`` holds a directory for every stateful role."""
        for n, role in self.roles.items():
            if role.actor.stateful and not (Path(checkpoint) / n).is_dir():
                raise ConfigError(
                    f"checkpoint={checkpoint!r} has no {n!r} directory for the {n} role's "
                    "training state; fix: pass a directory written by save_trainer() of a run "
                    f"with that role"
                )
