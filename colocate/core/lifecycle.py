"""A run's life around its loop: start-up, resume from a checkpoint, recovery, shutdown.

Each function drives one :class:`~colocate.core.runtime.Runtime` through rows of the hand-over
table; the coordinator calls them under its failure guard (a failure leaves FAILED) and keeps
the loop API.
"""

from __future__ import annotations

from dataclasses import replace

from colocate.core.config import LoadFormat
from colocate.core.contract import TrainerTenant
from colocate.core.errors import ColocateError
from colocate.core.handovers import (
    INIT,
    RECOVER,
    RESTART_ENGINES,
    RESTART_TRAINERS,
    START,
    TRAIN,
    ActorId,
    actors_of,
)
from colocate.core.phases import Phase
from colocate.core.run_config import SleepLevel
from colocate.core.runtime import Runtime
from placement import TenantKind

__all__ = ["start", "resume", "find_dead", "recover", "shutdown"]

# Creating an actor (a process, its imports) takes no device memory: every group is created
# at once, and what does take memory is ordered by the rows.
_SPAWN_ORDER = (TenantKind.ENGINE, TenantKind.ROLE, TenantKind.TRAINER)


def start(rt: Runtime) -> None:
    """Creates every actor, runs the start-up rows, and gives every engine the weights.

    Order: every actor is created; one chain, one driver wait for two rows: ``start`` builds
    the engines (vLLM sizes itself from the free memory) while trainer rank 0 hosts the trainer
    group's store, then ``init``: the trainer ranks prepare at once (imports, ops, group: no
    device memory), and per GPU the engines sleep before the trainer rank there takes its
    memory; the transfer groups are set up; the first verified sync (an engine started with
    dummy weights never serves before it) ends in ROLLOUT.
    """
    config, ex = rt.config, rt.executor
    for kind in _SPAWN_ORDER:
        for a in actors_of(rt.plan, kind):
            rt.fleet.spawn(a)
    step = rt.step().row(START, config.context())
    step.submit()  # the engines build while rank 0 hosts the store that ``init`` needs
    tag = ex.tag(INIT.name)
    master = rt.trainer_group(tag)
    dummy = config.engine.load_format is LoadFormat.DUMMY
    level = SleepLevel.DROP_WEIGHTS if dummy else config.sleep_level
    ctx = config.context(master=master, role_groups=rt.roles.groups(rt.roles.roles, tag))
    # Each row had this bound on its own before they ran together.
    step.row(INIT, replace(ctx, sleep_level=level)).run("start", 2 * config.timeouts.start_s)
    rt.sync.setup(ex.tag(INIT.name))
    rt.sync_weights()


def resume(rt: Runtime, checkpoint: str, weight_version: int) -> None:
    """The trainers (and stateful roles) load ``checkpoint``; a verified sync follows.

    Order: the ``train`` row (engines sleep, trainers reload), every rank loads the checkpoint
    (a stateful role, the critic, loads ``<checkpoint>/<role>`` in the same chain), the step
    counter becomes the checkpoint's, and a verified sync (version ``weight_version + 1``)
    gives every engine those weights before it serves again.
    """
    rt.roles.check_checkpoint(checkpoint)  # before anything moves
    step = rt.step().row(TRAIN, rt.config.context())
    tag = rt.executor.tag("resume")
    loads = [
        step.add(rt.fleet.call(a, TrainerTenant.load, checkpoint, tag=tag)) for a in rt.trainers()
    ]
    rt.roles.add_loads(step, checkpoint, tag)
    results = step.run("resume")
    rt.progress.step = results[loads[0]]
    rt.progress.weight_version = weight_version
    rt.sync_weights()


def find_dead(rt: Runtime, checkpoint: str | None) -> list[ActorId]:
    """Pings every actor; returns the dead ones if the run can recover from their loss.

    Raises:
        ColocateError: A trainer rank died and no checkpoint was given (the run stays
            FAILED).
    """
    # A survivor may still be blocked in the failed transfer until the transfer timeout:
    # wait that long for its answer before calling it dead.
    timeouts, sync = rt.config.timeouts, rt.config.sync
    dead = rt.fleet.dead(max(timeouts.ping_s, sync.timeout_s + 5.0))
    ranks = [a.index for a in dead if a.kind is TenantKind.TRAINER]
    if ranks and checkpoint is None:
        raise ColocateError(
            f"trainer rank(s) {ranks} died and took their ZeRO shards with them; fix: "
            "call recover(checkpoint=...) with a directory written by save_trainer()",
            actor=f"trainer{ranks[0]}",
            phase=rt.executor.phase.value,
            step=rt.progress.step,
        )
    return dead


def recover(rt: Runtime, dead: list[ActorId], checkpoint: str | None) -> None:
    """Replaces the ``dead`` actors, re-sends the trainer's weights, enters ROLLOUT.

    Order: (1) if a trainer rank died, its ZeRO shard is gone: every rank is killed, to be
    replaced and restored from ``checkpoint``; (2) each dead engine is replaced on its bundle
    once its death is confirmed (``restart-engines``: on a shared GPU the trainer offloads
    first, then the new engine starts); (3) a dead role's ranks are replaced and rebuilt from
    their config (``restart-roles``, in host memory); (4) replaced trainer ranks start
    (``restart-trainers``: engines sleep first) and load the checkpoint; (5) the ``recover``
    row (engines sleep, trainers reload); (6) the transfer groups are rebuilt and a verified
    sync brings every engine to the trainer's weights.
    """
    config, ex, fleet = rt.config, rt.executor, rt.fleet
    by_kind = {k: [a for a in dead if a.kind is k] for k in TenantKind}
    failed = dict(phase=Phase.FAILED.value, step=rt.progress.step)
    absent: frozenset[ActorId] = frozenset()
    if by_kind[TenantKind.TRAINER]:
        # Survivors are in a broken DeepSpeed group too: every rank goes.
        fleet.kill(*rt.trainers(), **failed)
        absent = frozenset(rt.trainers())
    if engines := by_kind[TenantKind.ENGINE]:
        fleet.kill(*engines, **failed)  # each replacement starts once its predecessor is gone
        for a in engines:
            fleet.spawn(a)
        ctx = config.context(selected=frozenset(engines), absent=absent)
        rt.run_row(RESTART_ENGINES, ctx, config.timeouts.start_s)
    if roles := by_kind[TenantKind.ROLE]:  # rebuilt from their configs
        rt.roles.restart(roles, checkpoint, absent, config.timeouts.start_s, rt.progress.step)
    if by_kind[TenantKind.TRAINER]:
        for a in rt.trainers():
            fleet.spawn(a)
        tag = ex.tag(RESTART_TRAINERS.name)
        master = rt.trainer_group(tag)
        rt.run_row(RESTART_TRAINERS, config.context(master=master), config.timeouts.start_s)
        rt.progress.step = rt.on_trainers(TrainerTenant.load, checkpoint)[0]
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
