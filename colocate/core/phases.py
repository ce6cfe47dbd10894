"""The phase protocol as data: the phases, the legal transitions, and each tenant's memory state.

The coordinator is the only owner of the current phase. The transitions between phases are the
rows of the hand-over table (``colocate.core.handovers``); the coordinator checks a row's source
phases before it touches any actor, so a step requested in the wrong phase fails before it can
cause an out-of-memory on a shared GPU.
"""

from __future__ import annotations

import enum

from placement import TenantKind

__all__ = [
    "Phase",
    "EngineMemory",
    "TrainerMemory",
    "RoleMemory",
    "RESIDENT",
    "PhaseError",
    "require",
]


class PhaseError(RuntimeError):
    """A call made in a phase that does not allow it."""


class Phase(enum.Enum):
    """Where the whole pipeline is; every GPU moves through the same sequence.

    INIT: configured; no actor exists yet.
    BOOT: engines started (awake); trainer ranks created (preparing, which takes no device
        memory), holding nothing yet.
    ROLLOUT: engines awake (weights + KV cache) and generating; trainers offloaded.
    SCORE: engines asleep, trainers offloaded; the forward-only roles (reference, reward model)
        score the rollout.
    TRAIN: engines asleep; trainers hold params, grads and optimizer states.
    SYNC: engines hold weights but no KV cache; trainers hold params only; weights stream.
    FAILED: a transition failed part-way; only ``recover`` or ``shutdown`` are allowed (the
        restart rows of recovery run in FAILED).
    SHUTDOWN: actors are gone.
    """

    INIT = "init"
    BOOT = "boot"
    ROLLOUT = "rollout"
    SCORE = "score"
    TRAIN = "train"
    SYNC = "sync"
    FAILED = "failed"
    SHUTDOWN = "shutdown"


class EngineMemory(enum.Enum):
    """What an engine holds on its GPU."""

    ASLEEP = "asleep"  # weights offloaded (level 1) or discarded (level 2), no KV cache
    WEIGHTS = "weights"  # weights resident, no KV cache
    AWAKE = "awake"  # weights and KV cache resident


class TrainerMemory(enum.Enum):
    """What a trainer rank holds on its GPU."""

    OFFLOADED = "offloaded"  # params, grads and optimizer states on host memory
    PARAMS = "params"  # params resident (to send them), the rest on host
    FULL = "full"  # everything resident: ready to train


class RoleMemory(enum.Enum):
    """What a role (reference, reward model, critic, a user's tenant) holds on its GPU."""

    OFFLOADED = "offloaded"  # its state on host memory (or, for a frozen model, dropped)
    RESIDENT = "resident"  # its state on the GPU: ready to run


# What each tenant on a shared GPU holds once a phase is reached (a tenant alone on its GPU
# keeps everything resident; a role is RESIDENT in the phases it names and OFFLOADED in the
# others, see colocate.roles.base). The coordinator checks every memory state an actor reports
# after a hand-over against this table. On every GPU the sum of what the tenants hold is at most one
# side's full working set plus the weights being transferred.
RESIDENT: dict[Phase, dict[TenantKind, enum.Enum]] = {
    Phase.BOOT: {TenantKind.ENGINE: EngineMemory.AWAKE},  # trainers hold nothing yet
    Phase.ROLLOUT: {
        TenantKind.ENGINE: EngineMemory.AWAKE,
        TenantKind.TRAINER: TrainerMemory.OFFLOADED,
    },
    Phase.SCORE: {
        TenantKind.ENGINE: EngineMemory.ASLEEP,
        TenantKind.TRAINER: TrainerMemory.OFFLOADED,
    },
    Phase.TRAIN: {TenantKind.ENGINE: EngineMemory.ASLEEP, TenantKind.TRAINER: TrainerMemory.FULL},
    Phase.SYNC: {TenantKind.ENGINE: EngineMemory.WEIGHTS, TenantKind.TRAINER: TrainerMemory.PARAMS},
}


def require(current: Phase, allowed: Phase | tuple[Phase, ...], action: str) -> None:
    """Raises :class:`PhaseError` unless ``current`` is one of ``allowed``."""
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    if current not in allowed:
        names = " or ".join(repr(p.value) for p in allowed)
        raise PhaseError(
            f"{action} needs phase {names}, but the pipeline is in {current.value!r}"
            + ("; call recover() first" if current is Phase.FAILED else "")
        )
