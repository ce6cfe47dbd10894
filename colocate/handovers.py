"""The hand-over table: every transition the coordinator makes, as data, and its pure planner.

A :class:`Row` says, for one transition, from which phases it may start, which phase it
reaches, which tenants release what and which acquire what. :func:`plan_handover` turns a row
into the concrete calls for one topology (pure: no Ray); the coordinator's one executor plans
them into a chain (:meth:`colocate.calls.Chain.add_handover`), in which on every GPU every
release finishes before any acquisition starts. The legal phase transitions
(:data:`TRANSITIONS`) are derived from the rows, so the table is the only statement of the
protocol.

Rows (name = the timeline tag of their spans), as ``from -> to: releases | acquisitions``:

- ``start``: INIT -> BOOT: none | every engine ``start``.
- ``init``: BOOT -> TRAIN: shared engines ``sleep(level)`` | every trainer ``start``.
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
  ``start``.

A tenant alone on its GPU (separate pools) has nothing to release or acquire. The weight
transfer runs inside SYNC, between the ``sync`` and ``rollout`` rows; each engine verifies what
it received and takes the new version (``EngineTenant.receive_weights``) before its ``wake_kv``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from colocate.contract import EngineTenant, TrainerTenant
from colocate.phases import Phase, PhaseError
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
    "SKIP_SYNC",
    "RECOVER",
    "RESTART_ENGINES",
    "RESTART_TRAINERS",
    "TABLE",
    "TRANSITIONS",
    "check_transition",
    "actors_of",
    "lanes_of",
    "plan_handover",
]


@dataclass(frozen=True, order=True)
class ActorId:
    """One actor of a pipeline: its kind and index (engine ``e``, trainer rank ``r``)."""

    kind: TenantKind
    index: int

    @property
    def name(self) -> str:
        """Display name, e.g. ``"engine0"``."""
        return f"{self.kind.value}{self.index}"

    @classmethod
    def parse(cls, name: str) -> ActorId:
        """The actor named ``name`` (``"engine1"``, ``"trainer0"``)."""
        digits = len(name) - len(name.rstrip("0123456789"))
        try:
            if not digits:
                raise ValueError(name)
            return cls(TenantKind(name[:-digits]), int(name[-digits:]))
        except ValueError:
            kinds = ", ".join(k.value for k in TenantKind)
            raise ValueError(
                f"actor {name!r} is not a name like 'engine0'; fix: use <kind><index> with "
                f"kind one of {kinds}"
            ) from None


class Scope(enum.Enum):
    """Which actors of a kind a move concerns.

    ALL: every actor of the kind. SHARED: those on a GPU shared with another actor.
    SELECTED: the actors named in :attr:`Context.selected`. BESIDE_SELECTED: shared actors
    of the kind on the GPUs of the selected ones.
    """

    ALL = "all"
    SHARED = "shared"
    SELECTED = "selected"
    BESIDE_SELECTED = "beside_selected"


@dataclass(frozen=True)
class Context:
    """The values a row's moves take when it runs.

    Attributes:
        sleep_level: Level of every engine sleep in the row.
        master: The trainer group's store (host, port), for trainer ``start``.
        collective_timeout_s: Bound on the trainer group's collectives, for ``start``.
        selected: Actors a SELECTED / BESIDE_SELECTED move concerns.
        absent: Actors that do not exist right now (killed, being replaced): never called.
    """

    sleep_level: int = 1
    master: tuple[str, int] | None = None
    collective_timeout_s: float = 300.0
    selected: frozenset[ActorId] = frozenset()
    absent: frozenset[ActorId] = frozenset()


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


@dataclass(frozen=True)
class PlannedCall:
    """One concrete call of a hand-over: who, what, with which arguments, on which GPUs."""

    actor: ActorId
    verb: Callable
    args: tuple
    lanes: tuple[int, ...]


@dataclass(frozen=True)
class Handover:
    """A row planned for one topology."""

    row: Row
    releases: tuple[PlannedCall, ...] = field(default_factory=tuple)
    acquires: tuple[PlannedCall, ...] = field(default_factory=tuple)


_E, _T = TenantKind.ENGINE, TenantKind.TRAINER


def _level(c: Context) -> tuple:
    return (c.sleep_level,)


def _trainer_start(c: Context) -> tuple:
    if c.master is None:
        raise ValueError("trainer start needs Context.master (the trainer group's store)")
    return (c.master, c.collective_timeout_s)


_SLEEP = Move(_E, EngineTenant.sleep, _level, Scope.SHARED)
_ENGINE_START = Move(_E, EngineTenant.start)
_TRAINER_START = Move(_T, TrainerTenant.start, _trainer_start)
_RELOAD = Move(_T, TrainerTenant.reload, scope=Scope.SHARED)
_OFFLOAD_ALL = Move(_T, TrainerTenant.offload, lambda c: (False,), Scope.SHARED)

START = Row("start", frozenset({Phase.INIT}), Phase.BOOT, (), (_ENGINE_START,))
INIT = Row("init", frozenset({Phase.BOOT}), Phase.TRAIN, (_SLEEP,), (_TRAINER_START,))
TRAIN = Row("train", frozenset({Phase.ROLLOUT}), Phase.TRAIN, (_SLEEP,), (_RELOAD,))
SYNC = Row(
    "sync",
    frozenset({Phase.TRAIN}),
    Phase.SYNC,
    (Move(_T, TrainerTenant.offload, lambda c: (True,), Scope.SHARED),),
    (Move(_E, EngineTenant.wake_weights, scope=Scope.SHARED),),
)
ROLLOUT = Row(
    "rollout",
    frozenset({Phase.SYNC}),
    Phase.ROLLOUT,
    (_OFFLOAD_ALL,),
    (Move(_E, EngineTenant.wake_kv, scope=Scope.SHARED),),
)
SKIP_SYNC = Row(
    "skip-sync",
    frozenset({Phase.TRAIN}),
    Phase.ROLLOUT,
    (_OFFLOAD_ALL,),
    (Move(_E, EngineTenant.wake_kv, scope=Scope.SHARED),),
)
RECOVER = Row("recover", frozenset({Phase.FAILED}), Phase.TRAIN, (_SLEEP,), (_RELOAD,))
RESTART_ENGINES = Row(
    "restart-engines",
    frozenset({Phase.FAILED}),
    Phase.FAILED,
    (Move(_T, TrainerTenant.offload, lambda c: (False,), Scope.BESIDE_SELECTED),),
    (Move(_E, EngineTenant.start, scope=Scope.SELECTED),),
)
RESTART_TRAINERS = Row(
    "restart-trainers", frozenset({Phase.FAILED}), Phase.FAILED, (_SLEEP,), (_TRAINER_START,)
)

TABLE: tuple[Row, ...] = (
    START,
    INIT,
    TRAIN,
    SYNC,
    ROLLOUT,
    SKIP_SYNC,
    RECOVER,
    RESTART_ENGINES,
    RESTART_TRAINERS,
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
    found = {ActorId(kind, t.index) for b in plan.bundles for t in b.tenants if t.kind is kind}
    return sorted(found)


def lanes_of(plan: Plan, actor: ActorId) -> tuple[int, ...]:
    """The GPUs (bundle indices) of ``actor``, in TP-rank order."""
    found = [
        (t.tp_rank, b.index)
        for b in plan.bundles
        for t in b.tenants
        if t.kind is actor.kind and t.index == actor.index
    ]
    if not found:
        raise ValueError(f"{actor.name} is not in the plan")
    return tuple(lane for _, lane in sorted(found))


def _chosen(move: Move, plan: Plan, ctx: Context) -> list[ActorId]:
    shared = set(plan.shared_bundles)
    actors = [a for a in actors_of(plan, move.kind) if a not in ctx.absent]
    if move.scope is Scope.ALL:
        return actors
    if move.scope is Scope.SELECTED:
        return [a for a in actors if a in ctx.selected]
    on_shared = [a for a in actors if shared & set(lanes_of(plan, a))]
    if move.scope is Scope.SHARED:
        return on_shared
    selected_lanes = {lane for a in ctx.selected for lane in lanes_of(plan, a)}
    return [a for a in on_shared if selected_lanes & set(lanes_of(plan, a))]


def _expand(moves: tuple[Move, ...], plan: Plan, ctx: Context) -> tuple[PlannedCall, ...]:
    return tuple(
        PlannedCall(a, m.verb, m.args(ctx), lanes_of(plan, a))
        for m in moves
        for a in _chosen(m, plan, ctx)
    )


@functools.lru_cache(maxsize=256)
def plan_handover(row: Row, plan: Plan, ctx: Context) -> Handover:
    """The concrete releases and acquisitions of ``row`` on ``plan``. Pure; never touches Ray.

    Pure, so cached: a loop step plans the same few rows every time.

    Order of the result: releases, then acquisitions, each in move order and then actor
    order. The executor starts every release at once and each acquisition as soon as the
    releases on its GPUs are done.
    """
    return Handover(row, _expand(row.releases, plan, ctx), _expand(row.acquires, plan, ctx))
