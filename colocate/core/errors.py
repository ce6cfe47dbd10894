"""Errors the coordinator raises to the user."""

from __future__ import annotations

__all__ = [
    "ColocateError",
    "ActorFailedError",
    "ActorTimeoutError",
    "ActorNotDeadError",
    "ActorStateError",
    "EngineRpcTimeoutError",
    "InputError",
]


class ColocateError(RuntimeError):
    """A step of the pipeline failed; the message names the actor, the phase and the step.

    Attributes:
        actor: The actor that failed (e.g. ``"engine1"``), or None.
        phase: The phase being entered or run.
        step: The RL step counter.
    """

    def __init__(self, message: str, *, actor: str | None, phase: str, step: int):
        super().__init__(message)
        self.actor = actor
        self.phase = phase
        self.step = step


class ActorFailedError(ColocateError):
    """An actor died or raised while running a step."""


class ActorTimeoutError(ColocateError):
    """An actor did not finish a step within its time bound."""


class ActorNotDeadError(ActorTimeoutError):
    """A killed actor that Ray did not report dead, with its process gone, within the bound.

    Nothing replaces it: a replacement on the same bundle could start beside a process that
    still holds the GPU's memory. The message names the actor and what was last seen of it.
    """


class ActorStateError(RuntimeError):
    """An actor (or its slot in the fleet) was asked for a step its state does not allow.

    E.g. a verb before ``start``, a send with the params offloaded, a model run on weights a
    level-2 sleep released, a replacement spawned while its predecessor is not confirmed dead.

    Raised inside the actor. The coordinator checks the phase before it calls, so this means a
    transition that failed part-way or a bug in the order, never the caller's input: the driver
    reports it as an :class:`ActorFailedError` naming the actor.
    """


class EngineRpcTimeoutError(RuntimeError):
    """A call into an engine's vLLM workers (``collective_rpc``) outlived its bound.

    Raised inside the engine actor; the bound is ``EngineConfig.rpc_timeout_s``.

    Attributes:
        engine: The engine's name (``"engine1"``).
        method: The worker method that was called.
        timeout_s: The bound that expired.
    """

    def __init__(
        self,
        message: str,
        *,
        engine: str | None = None,
        method: str | None = None,
        timeout_s: float | None = None,
    ):
        super().__init__(message)
        self.engine = engine
        self.method = method
        self.timeout_s = timeout_s


class InputError(ValueError):
    """Bad input detected inside an actor; re-raised as is (the actor itself is fine)."""
