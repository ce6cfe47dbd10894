"""The coordinator's side of the roles: their groups, their calls, their checkpoints, restarts.

The coordinator decides when; this driver knows how, for the roles of one pipeline
(``colocate.roles.base``). Ordering stays with the executor: every memory move of a role is a row
of the hand-over table, and every driver wait here is one of the executor's bounded waits.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from colocate.core.config import ConfigError
from colocate.core.errors import ColocateError
from colocate.core.executor import Executor, Step
from colocate.core.fleet import Fleet
from colocate.core.handovers import RESTART_ROLES, SCORE, ActorId, actors_of
from colocate.core.phases import Phase, PhaseError
from colocate.core.run_config import RunConfig
from colocate.roles.base import RoleActor, merge_rows, split_rows
from placement import Plan, TenantKind

__all__ = ["RoleDriver"]


class RoleDriver:
    """Groups, calls, checkpoints and restarts of a pipeline's roles.

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
        self.multi_node = config.spec.nodes > 1
        self.timeout_s = config.collective_timeout_s

    def ranks(self, role: str) -> list[ActorId]:
        """The actors of ``role``, in rank order."""
        return [a for a in actors_of(self.plan, TenantKind.ROLE) if a.role == role]

    def _collective(self, role: str) -> bool:
        return self.roles[role].actor.collective

    def _stateful(self, role: str) -> bool:
        return self.roles[role].actor.stateful

    def groups(self, names, tag) -> tuple:
        """Rank 0 of each collective role in ``names`` hosts its group's store (one wait)."""
        names = [n for n in names if self._collective(n)]
        calls = [
            self.fleet.call(
                self.ranks(n)[0],
                RoleActor.host_group_store,
                self.multi_node,
                self.timeout_s,
                tag=tag,
            )
            for n in names
        ]
        return tuple(zip(names, self.exec.wait(calls), strict=True)) if calls else ()

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
            per_rank = [(part, *args[1:]) for part in split_rows(args[0], len(ranks))]
        else:
            per_rank = [args] * len(ranks)
        tag = self.exec.tag(step.phase.value)
        steps = [
            step.add(self.fleet.call(a, verb, *a_args, tag=tag))
            for a, a_args in zip(ranks, per_rank, strict=True)
        ]

        def run():
            results = step.run(f"call_role:{role}")
            answers = [results[i] for i in steps]
            return merge_rows(answers) if shard else answers

        return run

    def save(self, path: str, tag) -> None:
        """Every rank of each stateful role (the critic) saves under ``path/<role>``."""
        calls = [
            self.fleet.call(a, self.roles[n].actor.save, str(Path(path) / n), tag=tag)
            for n in self.roles
            if self._stateful(n)
            for a in self.ranks(n)
        ]
        if calls:
            self.exec.wait(calls)

    def _stateful_path(self, checkpoint: str, role: str) -> str:
        return str(Path(checkpoint) / role)

    def check_checkpoint(self, checkpoint: str) -> None:
        """Raises unless ``checkpoint`` holds a directory for every stateful role."""
        for n in self.roles:
            path = Path(self._stateful_path(checkpoint, n))
            if self._stateful(n) and not path.is_dir():
                raise ConfigError(
                    f"checkpoint={checkpoint!r} has no {n!r} directory for the {n} role's "
                    "training state; fix: pass a directory written by save_trainer() of a run "
                    f"with that role"
                )

    def add_loads(self, step: Step, checkpoint: str, tag) -> list[int]:
        """Adds every stateful role's load of ``<checkpoint>/<role>`` (after its reload)."""
        return [
            step.add(
                self.fleet.call(
                    a, self.roles[n].actor.load, self._stateful_path(checkpoint, n), tag=tag
                )
            )
            for n in self.roles
            if self._stateful(n)
            for a in self.ranks(n)
        ]

    def restart(
        self, dead: list[ActorId], checkpoint: str | None, absent, start_s: float, step: int
    ):
        """Replaces the dead roles' actors, rebuilt from their configs (``restart-roles``).

        A collective role loses its group with any rank: all its ranks are replaced. A
        stateful one (the critic) is then restored from ``checkpoint/<role>``.

        Raises:
            ColocateError: A stateful role died and no checkpoint was given.
        """
        names = sorted({a.role for a in dead})
        lost = [n for n in names if self._stateful(n)]
        if lost and checkpoint is None:
            raise ColocateError(
                f"role(s) {lost} died with their training state; fix: call "
                "recover(checkpoint=...) with a directory written by save_trainer()",
                actor=next(a.name for a in dead if a.role in lost),
                phase=Phase.FAILED.value,
                step=step,
            )
        replaced = sorted(
            {a for n in names for a in (self.ranks(n) if self._collective(n) else [])} | set(dead),
            key=lambda a: (a.role, a.index),
        )
        # Each replacement starts only once its predecessor is confirmed gone.
        self.fleet.kill(*replaced, phase=Phase.FAILED.value, step=step)
        for a in replaced:
            self.fleet.spawn(a)
        tag = self.exec.tag(RESTART_ROLES.name)
        ctx = replace(
            self.ctx(selected=frozenset(replaced), absent=absent),
            role_groups=self.groups(names, tag),
        )
        self.exec.run(self.fleet, RESTART_ROLES, ctx, start_s)
        loads = [
            self.fleet.call(
                a, self.roles[a.role].actor.load, str(Path(checkpoint) / a.role), tag=tag
            )
            for a in replaced
            if a.role in lost
        ]
        if loads:
            self.exec.wait(loads)
