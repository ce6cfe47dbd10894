"""The hand-over table: every transition the coordinator makes, as data, and its pure planner.

A :class:`Row` says, for one transition, from which phases it may start, which phase it
reaches, which tenants release what and which acquire what, and which prepare (memory-free
work that waits for nothing). :func:`plan_handover` turns a row into the concrete calls for
one topology (pure: no Ray); the coordinator's one executor plans them into a chain
(:meth:`colocate.core.calls.Chain.add_handover`), in which on every GPU every release finishes
before any acquisition starts, and every preparation starts at once. The legal phase transitions
(:data:`TRANSITIONS`) are derived from the rows, so the table is the only statement of the
protocol.

Rows (name = the timeline tag of their spans), as ``from -> to: releases | acquisitions``
(``+ preparations``):

- ``start``: INIT -> BOOT: none | every engine ``start``.
- ``init``: BOOT -> TRAIN: shared engines ``sleep(level)`` | every trainer ``start`` (the
  acquiring part: model and optimizer on the device), every role ``start``, then the roles
  resident in TRAIN ``reload`` + every trainer ``prepare`` (imports, ops, trainer group: no
  device memory, so it waits for no engine; the coordinator submits this row while the
  engines still start).
- ``train``: ROLLOUT -> TRAIN: shared engines ``sleep(level)`` | shared trainers ``reload``.
- ``sync``: TRAIN -> SYNC: shared trainers ``offload(keep_params=True)`` | shared engines
  ``wake_weights``.
- ``rollout``: SYNC -> ROLLOUT: shared trainers ``offload(False)`` | shared engines
  ``wake_kv`` (each engine took the new version when it verified the transfer).
- ``skip-sync``: TRAIN -> ROLLOUT: shared trainers ``offload(False)`` | shared engines
  ``wake_kv`` (old weights, old version; sleep level 1 only).
- ``recover``: FAILED -> TRAIN: shared engines ``sleep(level)`` | shared trainers ``reload``.
- ``restart-engines``: FAILED -> FAILED: the trainers beside the replaced engines
  ``offload(False)`` | the replaced engines ``start``.
- ``restart-trainers``: FAILED -> FAILED: shared engines ``sleep(level)`` | every trainer
  ``start`` + every trainer ``prepare``.

- ``score``: ROLLOUT -> SCORE: shared engines ``sleep(level)`` | the roles resident in SCORE
  ``reload`` (the forward-only roles: reference, reward model).
- ``restart-roles``: FAILED -> FAILED: shared engines ``sleep(level)`` | the replaced roles
  ``start``.

Roles (``colocate.roles.base``) take part in every row that reaches a phase: on a shared GPU, each
role resident in the phase the row starts from but not in its target ``offload`` s with the
releases, and each role resident in the target but not in the start phase ``reload`` s with the
acquisitions
(``train`` from SCORE: the reference and the reward model offload before the trainer
reloads). Every role ``start`` s in the ``init`` row, beside the trainer ranks.

A tenant alone on its GPU (separate pools) has nothing to release or acquire. The weight
transfer runs inside SYNC, between the ``sync`` and ``rollout`` rows; each engine verifies what
it received and takes the new version (``EngineTenant.receive_weights``) before its ``wake_kv``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from colocate.core.contract import EngineTenant, RoleTenant, TrainerTenant
from colocate.core.phases import Phase, PhaseError, RoleMemory
from placement import Plan, TenantKind

__all__ = [
    "ActorId",
    "Scope",
    "Move",
    "Row",
    "Context",
    "PlannedCall",
    "Handover",
    "START",
    "INIT",
    "TRAIN",
    "SYNC",
    "ROLLOUT",
    "SCORE",
    "SKIP_SYNC",
    "RECOVER",
    "RESTART_ENGINES",
    "RESTART_TRAINERS",
    "RESTART_ROLES",
    "TABLE",
    "TRANSITIONS",
    "check_transition",
    "actors_of",
    "lanes_of",
    "plan_handover",
]


@dataclass(frozen=True, order=True)
class ActorId:
    """One actor of a pipeline: kind and index (engine ``e``, trainer rank ``r``, role rank).

    ``role`` is the role's name for a role's actor (empty for engines and trainers).
    """

    kind: TenantKind
    index: int
    role: str = ""

    @property
    def name(self) -> str:
        """Display name, e.g. ``"engine0"``, ``"reference1"``."""
        return f"{self.role or self.kind.value}{self.index}"

    @classmethod
    def parse(cls, name: str, roles: frozenset[str] = frozenset()) -> ActorId:
        """The actor named ``name`` (``"engine1"``, ``"trainer0"``, ``"<role>0"``)."""
        digits = len(name) - len(name.rstrip("0123456789"))
        try:
            if not digits:
                raise ValueError(name)
            prefix, index = name[:-digits], int(name[-digits:])
            if prefix in roles:
                return cls(TenantKind.ROLE, index, prefix)
            kind = TenantKind(prefix)
            if kind is TenantKind.ROLE:
                raise ValueError(name)
            return cls(kind, index)
        except ValueError:
            kinds = ", ".join([TenantKind.ENGINE.value, TenantKind.TRAINER.value, *sorted(roles)])
            raise ValueError(
                f"actor {name!r} is not a name like 'engine0'; fix: use <kind><index> with "
                f"kind one of {kinds}"
            ) from None


class Scope(enum.Enum):
    """Which actors of a kind a move concerns.

    ALL: every actor of the kind. SHARED: those on a GPU shared with another actor.
    SELECTED: the actors named in :attr:`Context.selected`. BESIDE_SELECTED: shared actors
    of the kind on the GPUs of the selected ones. LEAVING (roles): the roles on a shared GPU
    resident in the phase the row starts from but not in its target. ENTERING (roles): the
    roles resident in the row's target but not in the phase it starts from. (From FAILED,
    every role moves.)
    """

    ALL = "all"
    SHARED = "shared"
    SELECTED = "selected"
    BESIDE_SELECTED = "beside_selected"
    LEAVING = "leaving"
    ENTERING = "entering"


@dataclass(frozen=True)
class Context:
    """The values a row's moves take when it runs.

    Attributes:
        sleep_level: Level of every engine sleep in the row.
        master: The trainer group's store (host, port), for trainer ``start``.
        collective_timeout_s: Bound on the trainer group's collectives, for ``start``.
        selected: Actors a SELECTED / BESIDE_SELECTED move concerns.
        absent: Actors that do not exist right now (killed, being replaced): never called.
        role_phases: Each role's name and the phases it is resident in.
        role_groups: ``(role name, (host, port))`` of each collective role's group store.
    """

    sleep_level: int = 1
    master: tuple[str, int] | None = None
    collective_timeout_s: float = 300.0
    selected: frozenset[ActorId] = frozenset()
    absent: frozenset[ActorId] = frozenset()
    role_phases: tuple[tuple[str, frozenset[Phase]], ...] = ()
    role_groups: tuple[tuple[str, tuple[str, int]], ...] = ()

    def resident(self, role: str, phase: Phase) -> bool:
        """Whether role ``role`` is resident in ``phase``."""
        return any(name == role and phase in phases for name, phases in self.role_phases)


def _no_args(_: Context) -> tuple:
    return ()


@dataclass(frozen=True)
class Move:
    """One kind of tenant doing one contract method, with arguments taken from the context."""

    kind: TenantKind
    verb: Callable
    args: Callable[[Context], tuple] = _no_args
    scope: Scope = Scope.ALL


@dataclass(frozen=True)
class Row:
    """One transition: from which phases, to which phase, releases then acquisitions."""

    name: str
    sources: frozenset[Phase]
    target: Phase
    releases: tuple[Move, ...] = ()
    acquires: tuple[Move, ...] = ()
    #: Memory-free calls (no device memory taken or given back): they wait for nothing and
    #: are never ordered against the row's releases; an acquisition of the same actor runs
    #: after them (they are added first, and an actor runs its calls in order).
    prepares: tuple[Move, ...] = ()


@dataclass(frozen=True)
class PlannedCall:
    """One concrete call of a hand-over: who, what, with which arguments, on which GPUs.

    ``expect`` is the memory state the call must report (roles; for engines and trainers the
    executor reads it from ``colocate.core.phases.RESIDENT``).
    """

    actor: ActorId
    verb: Callable
    args: tuple
    lanes: tuple[int, ...]
    expect: enum.Enum | None = None


@dataclass(frozen=True)
class Handover:
    """A row planned for one topology."""

    row: Row
    releases: tuple[PlannedCall, ...] = field(default_factory=tuple)
    acquires: tuple[PlannedCall, ...] = field(default_factory=tuple)
    prepares: tuple[PlannedCall, ...] = field(default_factory=tuple)


_E, _T, _R = TenantKind.ENGINE, TenantKind.TRAINER, TenantKind.ROLE


def _level(c: Context) -> tuple:
    return (c.sleep_level,)


def _trainer_start(c: Context) -> tuple:
    if c.master is None:
        raise ValueError("trainer start needs Context.master (the trainer group's store)")
    return (c.master, c.collective_timeout_s)


_SLEEP = Move(_E, EngineTenant.sleep, _level, Scope.SHARED)
_ENGINE_START = Move(_E, EngineTenant.start)
_TRAINER_START = Move(_T, TrainerTenant.start, _trainer_start)
_TRAINER_PREPARE = Move(_T, TrainerTenant.prepare, _trainer_start)
_RELOAD = Move(_T, TrainerTenant.reload, scope=Scope.SHARED)
_OFFLOAD_ALL = Move(_T, TrainerTenant.offload, lambda c: (False,), Scope.SHARED)
_ROLE_OUT = Move(_R, RoleTenant.offload, scope=Scope.LEAVING)
_ROLE_IN = Move(_R, RoleTenant.reload, scope=Scope.ENTERING)


def _role_groups(c: Context) -> tuple:
    return (c.role_groups,)


START = Row("start", frozenset({Phase.INIT}), Phase.BOOT, (), (_ENGINE_START,))
# The trainer's start is split: its memory-free part waits for nothing (so it runs while the
# engines start and sleep), its acquiring part (model and optimizer on the device) for the
# engines on its GPU to have slept.
INIT = Row(
    "init",
    frozenset({Phase.BOOT}),
    Phase.TRAIN,
    (_SLEEP,),
    (_TRAINER_START, Move(_R, RoleTenant.start, _role_groups), _ROLE_IN),
    (_TRAINER_PREPARE,),
)
SCORE = Row("score", frozenset({Phase.ROLLOUT}), Phase.SCORE, (_SLEEP, _ROLE_OUT), (_ROLE_IN,))
TRAIN = Row(
    "train",
    frozenset({Phase.ROLLOUT, Phase.SCORE}),
    Phase.TRAIN,
    (_SLEEP, _ROLE_OUT),
    (_RELOAD, _ROLE_IN),
)
SYNC = Row(
    "sync",
    frozenset({Phase.TRAIN}),
    Phase.SYNC,
    (Move(_T, TrainerTenant.offload, lambda c: (True,), Scope.SHARED), _ROLE_OUT),
    (Move(_E, EngineTenant.wake_weights, scope=Scope.SHARED), _ROLE_IN),
)
ROLLOUT = Row(
    "rollout",
    frozenset({Phase.SYNC}),
    Phase.ROLLOUT,
    (_OFFLOAD_ALL, _ROLE_OUT),
    (Move(_E, EngineTenant.wake_kv, scope=Scope.SHARED), _ROLE_IN),
)
SKIP_SYNC = Row(
    "skip-sync",
    frozenset({Phase.TRAIN}),
    Phase.ROLLOUT,
    (_OFFLOAD_ALL, _ROLE_OUT),
    (Move(_E, EngineTenant.wake_kv, scope=Scope.SHARED), _ROLE_IN),
)
RECOVER = Row(
    "recover",
    frozenset({Phase.FAILED}),
    Phase.TRAIN,
    (_SLEEP, _ROLE_OUT),
    (_RELOAD, _ROLE_IN),
)
RESTART_ENGINES = Row(
    "restart-engines",
    frozenset({Phase.FAILED}),
    Phase.FAILED,
    (
        Move(_T, TrainerTenant.offload, lambda c: (False,), Scope.BESIDE_SELECTED),
        Move(_R, RoleTenant.offload, scope=Scope.BESIDE_SELECTED),
    ),
    (Move(_E, EngineTenant.start, scope=Scope.SELECTED),),
)
RESTART_TRAINERS = Row(
    "restart-trainers",
    frozenset({Phase.FAILED}),
    Phase.FAILED,
    (_SLEEP, Move(_R, RoleTenant.offload, scope=Scope.SHARED)),
    (_TRAINER_START,),
    (_TRAINER_PREPARE,),
)
RESTART_ROLES = Row(
    "restart-roles",
    frozenset({Phase.FAILED}),
    Phase.FAILED,
    (_SLEEP,),
    (Move(_R, RoleTenant.start, _role_groups, Scope.SELECTED),),
)

TABLE: tuple[Row, ...] = (
    START,
    INIT,
    SCORE,
    TRAIN,
    SYNC,
    ROLLOUT,
    SKIP_SYNC,
    RECOVER,
    RESTART_ENGINES,
    RESTART_TRAINERS,
    RESTART_ROLES,
)

#: Legal phase transitions, derived from the table (shutdown is allowed from anywhere).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    p: frozenset(r.target for r in TABLE if p in r.sources) for p in Phase
}


def check_transition(current: Phase, target: Phase) -> bool:
    """Whether ``current -> target`` must run; raises :class:`PhaseError` if no row allows it.

    Returns:
        ``False`` when already in ``target`` and no row loops there (nothing to do), else
        ``True``.
    """
    if target in TRANSITIONS[current]:
        return True
    if current is target and target not in (Phase.FAILED, Phase.SHUTDOWN):
        return False
    allowed = sorted(p.value for p in TRANSITIONS[current])
    raise PhaseError(
        f"cannot go from phase {current.value!r} to {target.value!r}; from "
        f"{current.value!r} the allowed next phases are {allowed or 'none'}"
    )


def actors_of(plan: Plan, kind: TenantKind) -> list[ActorId]:
    """Every actor of ``kind`` in ``plan``, by index."""
    found = {
        ActorId(kind, t.index, t.role) for b in plan.bundles for t in b.tenants if t.kind is kind
    }
    return sorted(found, key=lambda a: (a.role, a.index))


def lanes_of(plan: Plan, actor: ActorId) -> tuple[int, ...]:
    """The GPUs (bundle indices) of ``actor``, in TP-rank order."""
    found = [
        (t.tp_rank, b.index)
        for b in plan.bundles
        for t in b.tenants
        if t.kind is actor.kind and t.index == actor.index and t.role == actor.role
    ]
    if not found:
        raise ValueError(f"{actor.name} is not in the plan")
    return tuple(lane for _, lane in sorted(found))


def _moves_role(ctx: Context, role: str, row: Row, entering: bool, source) -> bool:
    # Exact, so that no call is made for nothing: a role enters when the target needs it and
    # the source phase (or, not given, some source of the row) did not, and leaves when the
    # source had it and the target does not. From FAILED its state is unknown: it always
    # moves (both mechanisms are idempotent).
    target = ctx.resident(role, row.target)
    froms = row.sources if source is None else {source}
    sources = [ctx.resident(role, p) for p in froms if p is not Phase.FAILED]
    unknown = Phase.FAILED in froms
    if entering:
        return target and (unknown or not all(sources))
    return not target and (unknown or any(sources))


def _chosen(move: Move, plan: Plan, ctx: Context, row: Row, source) -> list[ActorId]:
    shared = set(plan.shared_bundles)
    actors = [a for a in actors_of(plan, move.kind) if a not in ctx.absent]
    if move.scope is Scope.ALL:
        return actors
    if move.scope is Scope.SELECTED:
        return [a for a in actors if a in ctx.selected]
    if move.scope is Scope.ENTERING:
        return [a for a in actors if _moves_role(ctx, a.role, row, True, source)]
    on_shared = [a for a in actors if shared & set(lanes_of(plan, a))]
    if move.scope is Scope.SHARED:
        return on_shared
    if move.scope is Scope.LEAVING:
        return [a for a in on_shared if _moves_role(ctx, a.role, row, False, source)]
    selected_lanes = {lane for a in ctx.selected for lane in lanes_of(plan, a)}
    return [a for a in on_shared if selected_lanes & set(lanes_of(plan, a))]


_ROLE_STATE = {RoleTenant.offload: RoleMemory.OFFLOADED, RoleTenant.reload: RoleMemory.RESIDENT}


def _expand(moves: tuple[Move, ...], plan: Plan, ctx: Context, row: Row, source):
    return tuple(
        PlannedCall(
            a,
            m.verb,
            m.args(ctx),
            lanes_of(plan, a),
            _ROLE_STATE.get(m.verb),
        )
        for m in moves
        for a in _chosen(m, plan, ctx, row, source)
    )


@functools.lru_cache(maxsize=256)
def plan_handover(row: Row, plan: Plan, ctx: Context, source: Phase | None = None) -> Handover:
    """The concrete releases and acquisitions of ``row`` on ``plan``. Pure; never touches Ray.

    ``source`` is the phase the row starts from (one of its sources): roles then move only
    when that phase and the target disagree; None plans for any of the row's sources.

    Pure, so cached: a loop step plans the same few rows every time.

    Order of the result: releases, then acquisitions, then preparations, each in move order
    and then actor order. The executor starts every release and every preparation at once and
    each acquisition as soon as the releases on its GPUs are done.
    """
    return Handover(
        row,
        _expand(row.releases, plan, ctx, row, source),
        _expand(row.acquires, plan, ctx, row, source),
        _expand(row.prepares, plan, ctx, row, source),
    )
