"""A started run's parts, built together by one builder: reservation, fleet, role and sync drivers.

The coordinator owns a :class:`Runtime` from the moment its GPUs are reserved; nothing in it is
set afterwards. What the loop, the start-up and the recovery share (a driver round over the
fleet, the trainer group's store, the verified weight sync, span collection) lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from colocate.algorithms.rollouts import VersionLedger
from colocate.core.config import check_engine_model
from colocate.core.contract import Tag, Tenant
from colocate.core.executor import Executor, Step
from colocate.core.faults import Fault, coerce_fault
from colocate.core.fleet import Fleet
from colocate.core.handovers import ROLLOUT, SYNC, TRAIN, ActorId, Context, Row, actors_of
from colocate.core.phases import Phase
from colocate.core.role_driver import RoleDriver
from colocate.core.run_config import RunConfig
from colocate.core.syncing import SyncDriver, SyncReport
from colocate.core.tenants import TenantGroup
from colocate.operations.memory_check import check_run
from colocate.operations.memory_plan import MemoryPlan
from placement import Plan, Reservation, TenantKind, reserve

__all__ = ["Progress", "Runtime", "build_runtime"]


@dataclass
class Progress:
    """Where a run is: its optimizer steps, the engines' weight version, the last sync.

    Attributes:
        step: Optimizer steps taken (a resume or a recovery sets the checkpoint's).
        weight_version: The version every engine serves (-1: dummy weights, never synced).
        versions: Which trainer step each weight version carries (for staleness).
        last_sync: The report of the last verified sync.
    """

    step: int = 0
    weight_version: int = 0
    versions: VersionLedger = field(default_factory=VersionLedger)
    last_sync: SyncReport | None = None


@dataclass(frozen=True)
class Runtime:
    """The parts of one started run (made only by :func:`build_runtime`)."""

    config: RunConfig
    plan: Plan
    executor: Executor
    progress: Progress
    reservation: Reservation
    memory_plan: MemoryPlan | None
    fleet: Fleet
    roles: RoleDriver
    sync: SyncDriver
    groups: tuple[TenantGroup, ...]

    def step(self) -> Step:
        """A new driver round over the fleet, from the current phase."""
        return self.executor.step(self.fleet)

    def run_row(self, row: Row, ctx: Context | None = None, timeout_s=None) -> list:
        """Executes one row of the hand-over table on its own (one driver wait)."""
        return self.executor.run(self.fleet, row, ctx or self.config.context(), timeout_s)

    def trainers(self) -> list[ActorId]:
        """Every trainer rank, in rank order."""
        return actors_of(self.plan, TenantKind.TRAINER)

    def on_trainers(self, verb, *args) -> list:
        """``verb(*args)`` on every trainer rank, in one bounded driver round."""
        tag = self.executor.tag(self.executor.phase.value)
        calls = [self.fleet.call(a, verb, *args, tag=tag) for a in self.trainers()]
        return self.executor.wait(calls, self.config.timeouts.step_s)

    def group_stores(self, tag: Tag, names=None) -> dict[str, tuple[str, int]]:
        """Rank 0 of every collective group (of ``names``, if given) hosts its group's store.

        One bounded driver round. Returns each group's store (host, port) by group name.
        """
        wanted = [g for g in self.groups if g.collective and (names is None or g.name in names)]
        multi_node, bound = self.config.spec.nodes > 1, self.config.collective_timeout_s
        calls = [
            self.fleet.call(g.ranks[0], g.actor_cls.host_group_store, multi_node, bound, tag=tag)
            for g in wanted
        ]
        stores = self.executor.wait(calls, self.config.timeouts.step_s) if calls else []
        return {g.name: store for g, store in zip(wanted, stores, strict=True)}

    def stateful(self, names=None) -> list[TenantGroup]:
        """The groups that hold trained state (of ``names``, if given)."""
        return [g for g in self.groups if g.stateful and (names is None or g.name in names)]

    def save(self, root: str) -> None:
        """Every rank of every stateful group saves under ``root`` (one driver round)."""
        tag = self.executor.tag(self.executor.phase.value)
        calls = [
            self.fleet.call(a, g.actor_cls.save, g.checkpoint_dir(root), tag=tag)
            for g in self.stateful()
            for a in g.ranks
        ]
        self.executor.wait(calls, self.config.timeouts.step_s)

    def add_loads(self, step: Step, root: str, names=None) -> int | None:
        """Adds every rank's load of its group's state from ``root`` to ``step``.

        Returns:
            The step index of trainer rank 0's load (its answer is the checkpoint's optimizer
            step), or None when the trainer is not among the groups loaded.
        """
        tag = self.executor.tag("load")
        first = None
        for g in self.stateful(names):
            for a in g.ranks:
                i = step.add(self.fleet.call(a, g.actor_cls.load, g.checkpoint_dir(root), tag=tag))
                if g.kind is TenantKind.TRAINER and a.index == 0:
                    first = i
        return first

    def sync_weights(self) -> SyncReport:
        """Rows ``train`` (from ROLLOUT) and ``sync``; the transfer; row ``rollout``.

        One driver wait. Each engine takes the new version only after it verified what it
        received; the run's ``weight_version`` follows once every engine did.
        """
        progress, ctx = self.progress, self.config.context()
        step = self.step().row(TRAIN, ctx).row(SYNC, ctx)
        version = progress.weight_version + 1 if progress.weight_version >= 0 else 1
        sent = self.sync.add_transfer(step, version, self.executor.tag(Phase.SYNC.value))
        results = step.row(ROLLOUT, ctx).run("sync")
        progress.weight_version = version
        progress.versions.record(version, progress.step)
        progress.last_sync = self.sync.report(sent, results)
        return progress.last_sync

    def inject_fault(self, actor: str, fault: Fault | str) -> None:
        """Test hook: arms ``fault`` (a :class:`~colocate.core.faults.Fault`) in ``actor``.

        ``actor`` is a name like ``"engine1"``, ``"trainer0"`` or ``"reference0"``; each fault
        goes to its kind of actor (anything else is refused).
        """
        fault = coerce_fault(fault)
        target = ActorId.parse(actor, frozenset(self.roles.roles))
        if target.kind is not fault.kind:
            raise ValueError(
                f"fault {fault.value!r} is armed in a {fault.kind.value}, not in {actor!r}"
            )
        tag = self.executor.tag("fault")
        call = self.fleet.call(target, Tenant.inject_fault, fault, tag=tag)
        self.executor.wait([call], self.config.timeouts.step_s)

    def collect_spans(self, timeout_s: float = 30.0) -> None:
        """Every actor's recorded spans (and the executor's own) go to the timeline."""
        ex = self.executor
        with ex.span("collect_spans", ex.tag(ex.phase.value)):
            ex.rounds += 1
            spans = self.fleet.drain_spans(timeout_s)
        ex.timeline.extend(spans)
        ex.timeline.extend(ex.recorder.drain())


def build_runtime(config: RunConfig, plan: Plan, executor: Executor, progress: Progress) -> Runtime:
    """Reserves the GPUs, checks the run on them, and builds fleet and drivers together.

    Order: reserve (the probe reports each bundle's device); the device-specific config
    checks and the memory plan run on those bundles (a refusal gives the GPUs back at once);
    then fleet, role driver and sync driver are built on the reservation. No actor starts.

    Raises:
        MemoryPlanError: A phase cannot fit on a bundle.
        ConfigError: The engine's model does not suit the device found.
    """
    with executor.span("reserve", executor.tag("start")):
        reservation = reserve(
            plan,
            timeout_s=min(120.0, config.timeouts.start_s),
            name=config.name,
            probe=config.probe,
        )
    try:
        check_engine_model(config.engine, reservation.device)
        memory = None
        if config.check_memory:
            memory = check_run(
                config.engine,
                config.trainer,
                config.sync,
                plan,
                reservation,
                config.sleep_level,
                config.roles,
            )
    except BaseException:
        reservation.release()  # nothing started: give the GPUs back now
        raise
    fleet = Fleet(config, plan, reservation)
    sync = SyncDriver(
        fleet,
        config.engine,
        config.sync,
        config.timeouts.step_s,
        config.name,
        executor.timeline.extend,
    )
    roles = RoleDriver(config, plan, fleet, executor)
    groups = tuple(fleet.groups.values())
    return Runtime(
        config, plan, executor, progress, reservation, memory, fleet, roles, sync, groups
    )
