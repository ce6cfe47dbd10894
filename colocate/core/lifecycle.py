"""A run's life around its loop: start-up, resume from a checkpoint, recovery, shutdown.

Each function drives one :class:`~colocate.core.runtime.Runtime` through rows of the hand-over
table; the coordinator calls them under its failure guard (a failure leaves FAILED) and keeps
the loop API.
"""

from __future__ import annotations

from dataclasses import replace

from colocate.core.config import LoadFormat
from colocate.core.errors import ColocateError
from colocate.core.handovers import (
    INIT,
    RECOVER,
    RESTART_ENGINES,
    RESTART_ROLES,
    RESTART_TRAINERS,
    START,
    TRAIN,
    ActorId,
    Context,
)
from colocate.core.phases import Phase
from colocate.core.run_config import SleepLevel
from colocate.core.runtime import Runtime
from placement import TenantKind

__all__ = ["start", "resume", "find_dead", "recover", "shutdown"]

# Creating an actor (a process, its imports) takes no device memory: every group is created
# at once, and what does take memory is ordered by the rows.
_SPAWN_ORDER = (TenantKind.ENGINE, TenantKind.ROLE, TenantKind.TRAINER)
_TRAINER_GROUP = "trainer"  # the policy's trainer ranks (``colocate.core.tenants``)


def start(rt: Runtime) -> None:
    """Creates every actor, runs the start-up rows, and gives every engine the weights.

    Order: every actor is created; one chain, one driver wait for two rows: ``start`` builds
    the engines (vLLM sizes itself from the free memory) while rank 0 of every collective
    group (the trainer's, a critic's) hosts its group's store, then ``init``: the trainer
    ranks prepare at once (imports, ops, group: no device memory), and per GPU the engines
    sleep before the trainer rank there takes its memory; the transfer groups are set up; the
    first verified sync (an engine started with dummy weights never serves before it) ends in
    ROLLOUT.
    """
    config, ex = rt.config, rt.executor
    for g in sorted(rt.groups, key=lambda g: _SPAWN_ORDER.index(g.kind)):
        for a in g.ranks:
            rt.fleet.spawn(a)
    step = rt.step().row(START, config.context())
    step.submit()  # the engines build while the groups' stores start (``init`` needs them)
    tag = ex.tag(INIT.name)
    ctx = _with_stores(config.context(), rt.group_stores(tag))
    dummy = config.engine.load_format is LoadFormat.DUMMY
    level = SleepLevel.DROP_WEIGHTS if dummy else config.sleep_level
    # Each row had this bound on its own before they ran together.
    step.row(INIT, replace(ctx, sleep_level=level)).run("start", 2 * config.timeouts.start_s)
    rt.sync.setup(ex.tag(INIT.name))
    rt.sync_weights()


def _with_stores(ctx: Context, stores: dict[str, tuple[str, int]]) -> Context:
    """``ctx`` with the trainer group's store and every collective role's."""
    roles = tuple((n, s) for n, s in stores.items() if n != _TRAINER_GROUP)
    return replace(ctx, master=stores.get(_TRAINER_GROUP, ctx.master), role_groups=roles)


def resume(rt: Runtime, checkpoint: str, weight_version: int) -> None:
    """Every stateful group (the trainer, a critic) loads ``checkpoint``; a verified sync follows.

    Order: the ``train`` row (engines sleep, trainers reload), every rank of every stateful
    group loads its part of the checkpoint in the same chain, the step counter becomes the
    checkpoint's, and a verified sync (version ``weight_version + 1``) gives every engine
    those weights before it serves again.
    """
    rt.roles.check_checkpoint(checkpoint)  # before anything moves
    step = rt.step().row(TRAIN, rt.config.context())
    first = rt.add_loads(step, checkpoint)
    results = step.run("resume")
    rt.progress.step = results[first]
    rt.progress.weight_version = weight_version
    rt.sync_weights()


def _lost(rt: Runtime, dead: list[ActorId]) -> dict[str, tuple[ActorId, ...]]:
    """The ranks to replace, by group: every rank of a collective group that lost one."""
    lost = {}
    for g in rt.groups:
        gone = tuple(a for a in g.ranks if a in dead)
        if gone:
            lost[g.name] = g.ranks if g.collective else gone
    return lost


def find_dead(rt: Runtime, checkpoint: str | None) -> list[ActorId]:
    """Pings every actor; returns the dead ones if the run can recover from their loss.

    Raises:
        ColocateError: A stateful group (the trainer, a critic) lost a rank and no checkpoint
            was given (the run stays FAILED).
    """
    # A survivor may still be blocked in the failed transfer until the transfer timeout:
    # wait that long for its answer before calling it dead.
    timeouts, sync = rt.config.timeouts, rt.config.sync
    dead = rt.fleet.dead(max(timeouts.ping_s, sync.timeout_s + 5.0))
    lost = _lost(rt, dead)
    for g in rt.stateful(lost):
        if checkpoint is None:
            ranks = [a.index for a in g.ranks if a in dead]
            what = "their ZeRO shards" if g.kind is TenantKind.TRAINER else "their training state"
            raise ColocateError(
                f"{g.name} rank(s) {ranks} died and took {what} with them; fix: call "
                "recover(checkpoint=...) with a directory written by save_trainer()",
                actor=next(a.name for a in g.ranks if a in dead),
                phase=rt.executor.phase.value,
                step=rt.progress.step,
            )
    return dead


# Which row restarts each kind, in the order they run: engines first (on a shared GPU the
# trainer offloads before a new engine starts), roles in host memory, the trainer ranks last
# (the engines sleep first).
_RESTARTS = (
    (TenantKind.ENGINE, RESTART_ENGINES),
    (TenantKind.ROLE, RESTART_ROLES),
    (TenantKind.TRAINER, RESTART_TRAINERS),
)


def recover(rt: Runtime, dead: list[ActorId], checkpoint: str | None) -> None:
    """Replaces the ``dead`` actors, restores stateful groups, re-sends the weights.

    Order: (1) every rank to replace is killed, and confirmed dead before anything replaces
    it (a collective group that lost one rank loses them all: the trainer's ZeRO group, a
    critic's); (2) per kind, engines then roles then trainer ranks, the replacements start
    through their restart row (``restart-engines``: on a shared GPU the trainer offloads
    first; ``restart-roles``: in host memory; ``restart-trainers``: the engines sleep first),
    collective groups hosting their stores first; (3) every replaced stateful group loads
    ``checkpoint`` (one driver round; the step counter becomes the checkpoint's if the
    trainer was replaced); (4) the ``recover`` row (engines sleep, trainers reload); (5) the
    transfer groups are rebuilt and a verified sync brings every engine to the trainer's
    weights.
    """
    config, ex, fleet = rt.config, rt.executor, rt.fleet
    lost = _lost(rt, dead)
    replaced = [a for ranks in lost.values() for a in ranks]
    fleet.kill(*replaced, phase=Phase.FAILED.value, step=rt.progress.step)
    absent = set(replaced)
    for kind, row in _RESTARTS:
        ranks = [a for a in replaced if a.kind is kind]
        if not ranks:
            continue
        for a in ranks:
            fleet.spawn(a)
        absent -= set(ranks)
        tag = ex.tag(row.name)
        stores = rt.group_stores(tag, {g.name for g in rt.groups if set(g.ranks) & set(ranks)})
        ctx = config.context(selected=frozenset(ranks), absent=frozenset(absent))
        rt.run_row(row, _with_stores(ctx, stores), config.timeouts.start_s)
    if rt.stateful(lost):
        step = rt.step()
        first = rt.add_loads(step, checkpoint, lost)
        results = step.run("restore")
        if first is not None:
            rt.progress.step = results[first]  # the trainers are back at the checkpoint's
    rt.run_row(RECOVER)
    # A failed transfer may have left a group half-used: always rebuild the groups.
    rt.sync.setup(ex.tag(RECOVER.name))
    rt.sync_weights()


def shutdown(rt: Runtime) -> None:
    """Collects the last spans, stops every actor (confirmed dead) and releases the GPUs."""
    try:
        rt.collect_spans()
        rt.fleet.shutdown()
    finally:
        rt.reservation.release()
