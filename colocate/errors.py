"""Errors the coordinator raises to the user."""

from __future__ import annotations

__all__ = ["ColocateError", "ActorFailedError", "ActorTimeoutError", "InputError"]


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


class InputError(ValueError):
    """Bad input detected inside an actor; re-raised as is (the actor itself is fine)."""
