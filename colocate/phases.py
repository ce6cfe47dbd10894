"""The phase protocol as data: the phases, the legal transitions, and each tenant's memory state.

The coordinator is the only owner of the current phase. It consults :func:`check_transition`
before it touches any actor, so a step requested in the wrong phase fails before it can cause
an out-of-memory on a shared GPU.
"""

from __future__ import annotations

import enum

__all__ = [
    "Phase",
    "EngineMemory",
    "TrainerMemory",
    "TRANSITIONS",
    "RESIDENT",
    "PhaseError",
    "check_transition",
]


class PhaseError(RuntimeError):
    """A call made in a phase that does not allow it."""


class Phase(enum.Enum):
    """Where the whole pipeline is; every GPU moves through the same sequence.

    INIT: actors created; engines asleep, trainers hold their full training state.
    ROLLOUT: engines awake (weights + KV cache) and generating; trainers offloaded.
    TRAIN: engines asleep; trainers hold params, grads and optimizer states.
    SYNC: engines hold weights but no KV cache; trainers hold params only; weights stream.
    FAILED: a transition failed part-way; only ``recover`` or ``shutdown`` are allowed.
    SHUTDOWN: actors are gone.
    """

    INIT = "init"
    ROLLOUT = "rollout"
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


# Legal transitions. SYNC -> ROLLOUT is the only way to ROLLOUT once started, except TRAIN ->
# ROLLOUT, which skips the sync (the engines keep the weights they had); the coordinator allows
# that only with sleep level 1, which keeps a host copy of the weights.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.INIT: frozenset({Phase.SYNC}),
    Phase.SYNC: frozenset({Phase.ROLLOUT}),
    Phase.ROLLOUT: frozenset({Phase.TRAIN, Phase.SYNC}),
    Phase.TRAIN: frozenset({Phase.SYNC, Phase.ROLLOUT}),
    Phase.FAILED: frozenset({Phase.SYNC}),
    Phase.SHUTDOWN: frozenset(),
}

# What each tenant holds on a shared GPU once a phase is reached. On every GPU the sum of what
# the tenants hold is at most one side's full working set plus the weights being transferred.
RESIDENT: dict[Phase, tuple[EngineMemory, TrainerMemory]] = {
    Phase.INIT: (EngineMemory.ASLEEP, TrainerMemory.FULL),
    Phase.ROLLOUT: (EngineMemory.AWAKE, TrainerMemory.OFFLOADED),
    Phase.TRAIN: (EngineMemory.ASLEEP, TrainerMemory.FULL),
    Phase.SYNC: (EngineMemory.WEIGHTS, TrainerMemory.PARAMS),
}


def check_transition(current: Phase, target: Phase) -> bool:
    """Whether ``current -> target`` must run; raises :class:`PhaseError` if it is illegal.

    Returns:
        ``False`` when already in ``target`` (transitions are idempotent), else ``True``.
    """
    if current is target and target not in (Phase.FAILED, Phase.SHUTDOWN):
        return False
    if target not in TRANSITIONS.get(current, frozenset()):
        allowed = sorted(p.value for p in TRANSITIONS.get(current, frozenset()))
        raise PhaseError(
            f"cannot go from phase {current.value!r} to {target.value!r}; from "
            f"{current.value!r} the allowed next phases are {allowed or 'none'}"
        )
    return True


def require(current: Phase, allowed: Phase | tuple[Phase, ...], action: str) -> None:
    """Raises :class:`PhaseError` unless ``current`` is one of ``allowed``."""
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    if current not in allowed:
        names = " or ".join(repr(p.value) for p in allowed)
        raise PhaseError(
            f"{action} needs phase {names}, but the pipeline is in {current.value!r}"
            + ("; call recover() first" if current is Phase.FAILED else "")
        )
