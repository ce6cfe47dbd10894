"""Typed dispatch to actors, bounded waits, and the per-GPU hand-over.

A :class:`Call` names the actor method itself (``EngineTenant.sleep``), never a string; its
arguments are checked against the method's signature on the driver before anything is sent.
:func:`wait_all` turns a dead or slow actor into a typed error naming the actor, phase and step;
:func:`handover` runs one transition with every release on a GPU finished before any
acquisition on that GPU starts, GPUs proceeding independently.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from colocate.contract import Tag
from colocate.errors import ActorFailedError, ActorTimeoutError, InputError
from colocate.phases import PhaseError

__all__ = ["Call", "wait_all", "handover"]


@functools.cache
def _signature(verb: Callable) -> inspect.Signature:
    return inspect.signature(verb)


@dataclass(frozen=True)
class Call:
    """One contract method on one actor, not yet started.

    Attributes:
        actor: Display name (``"engine0"``).
        handle: The Ray actor handle.
        verb: The contract method (e.g. ``EngineTenant.sleep``); the actor runs its own
            implementation of it.
        args: Positional arguments (checked against ``verb``'s signature).
        tag: Timeline tag (phase or transition, step) the actor records its spans under.
        lanes: GPUs (bundle indices) it concerns; for the per-GPU hand-over.
    """

    actor: str
    handle: Any
    verb: Callable
    args: tuple = ()
    tag: Tag = ("direct", 0, 0)
    lanes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            _signature(self.verb).bind(None, *self.args)  # None stands for self
        except TypeError as exc:
            raise TypeError(
                f"{self.verb.__qualname__}{_signature(self.verb)} cannot take "
                f"{len(self.args)} argument(s) {self.args!r:.120} for {self.actor}: {exc}"
            ) from None

    @property
    def method(self) -> str:
        """The method's name (for messages and Ray's task names)."""
        return self.verb.__name__

    def start(self, *after: ray.ObjectRef) -> ray.ObjectRef:
        """Submits the call; Ray runs it only after the ``after`` results exist."""
        task = self.handle.invoke.options(name=f"{self.actor}.{self.method}")
        return task.remote(self.method, self.args, self.tag, *after)


def _raise_for(call: Call, exc: BaseException) -> None:
    phase, step = call.tag[:2]
    if _is_death(exc):
        raise ActorFailedError(
            f"{call.actor} died during {call.method} (phase {phase!r}, step {step}): {exc}",
            actor=call.actor,
            phase=phase,
            step=step,
        ) from exc
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
    if isinstance(cause, (InputError, PhaseError)):
        raise cause  # the caller's input (or its timing) was refused; the actor is healthy
    raise ActorFailedError(
        f"{call.actor} failed in {call.method} (phase {phase!r}, step {step}): "
        f"{type(cause).__name__}: {cause}",
        actor=call.actor,
        phase=phase,
        step=step,
    ) from cause


def wait_all(calls: Sequence[Call], timeout_s: float, refs: Sequence | None = None) -> list:
    """Starts ``calls`` (unless ``refs`` are given) and returns their results in order.

    When one call fails, the others get a short grace period, and an actor that died is
    reported in preference to a peer that merely lost its connection to it: the error names
    the root cause.

    Raises:
        ActorFailedError: A call failed (dead actor or exception).
        ActorTimeoutError: Some call had not finished after ``timeout_s``.
        InputError: An actor refused the caller's input (re-raised as is).
    """
    refs = list(refs) if refs is not None else [c.start() for c in calls]
    by_ref = dict(zip(refs, calls, strict=True))
    deadline = time.monotonic() + timeout_s
    remaining = list(refs)
    while remaining:
        done, remaining = ray.wait(
            remaining, num_returns=1, timeout=max(0.0, deadline - time.monotonic())
        )
        if not done:
            late = ", ".join(f"{by_ref[r].actor}.{by_ref[r].method}" for r in remaining)
            first = by_ref[remaining[0]]
            phase, step = first.tag[:2]
            raise ActorTimeoutError(
                f"{late} did not finish within {timeout_s:g} s (phase {phase!r}, step {step})",
                actor=first.actor,
                phase=phase,
                step=step,
            )
        try:
            ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - converted to a typed error naming the actor
            _raise_for(*_root_cause(done[0], exc, remaining, by_ref))
    return ray.get(refs)


def _root_cause(ref, exc, remaining, by_ref, grace_s: float = 5.0):
    """The failure to report.

    A dead actor among the calls still running, if one shows up within ``grace_s``; else the
    failure seen first.
    """
    if _is_death(exc) or not remaining:
        return by_ref[ref], exc
    done, _ = ray.wait(remaining, num_returns=len(remaining), timeout=grace_s)
    for other in done:
        try:
            ray.get(other)
        except Exception as other_exc:  # noqa: BLE001
            if _is_death(other_exc):
                return by_ref[other], other_exc
    return by_ref[ref], exc


def _is_death(exc: BaseException) -> bool:
    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError))


def handover(releases: Sequence[Call], acquires: Sequence[Call], timeout_s: float) -> list:
    """Runs one transition: per GPU, all releases end before any acquisition starts.

    Order: every release is submitted at once; each acquisition is submitted with the result
    references of the releases on its GPUs as extra arguments, so Ray runs it only once those
    releases have finished, without a round trip through the driver. GPUs with nothing to
    release acquire at once; independent GPUs never wait for each other; an acquisition that
    spans several GPUs (a TP engine) waits for the releases on all of them. The release
    results travel as Ray arguments of the acquisition's ``invoke`` and never reach the method.

    Returns:
        The releases' results, then the acquisitions', in the order given.
    """
    by_lane: dict[int, list] = {}
    release_refs = []
    for c in releases:
        ref = c.start()
        release_refs.append(ref)
        for lane in c.lanes:
            by_lane.setdefault(lane, []).append(ref)
    acquire_refs = []
    for c in acquires:
        after = list({id(r): r for lane in c.lanes for r in by_lane.get(lane, [])}.values())
        acquire_refs.append(c.start(*after))
    return wait_all([*releases, *acquires], timeout_s, refs=release_refs + acquire_refs)
