"""Typed dispatch to actors, bounded waits, and the per-GPU hand-over.

A :class:`Call` names the actor method itself (``EngineTenant.sleep``), never a string; its
arguments are checked against the method's signature on the driver before anything is sent.
:func:`wait_all` turns a dead or slow actor into a typed error naming the actor, phase and step;
:class:`Chain` submits calls together, each waiting on the actors for those it depends on;
:meth:`Chain.add_handover` adds one transition, with every release on a GPU finished before
any acquisition on that GPU starts, GPUs proceeding independently, and memory-free
preparations waiting for nothing.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from colocate.core.contract import Reply, StepFailed, Tag
from colocate.core.errors import ActorFailedError, ActorTimeoutError, InputError
from colocate.core.phases import PhaseError
from weight_sync.errors import VerificationError

__all__ = ["Call", "Chain", "wait_all"]


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
        return self.handle.invoke.remote(self.method, self.args, self.tag, *after)


def _raise_for(call: Call, exc: BaseException) -> None:
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
    if isinstance(cause, StepFailed) and isinstance(call, _Program):
        call, exc = call.members[cause.index], cause.error  # the step of the program that failed
    phase, step = call.tag[:2]
    if _is_death(exc):
        raise ActorFailedError(
            f"{call.actor} died during {call.method} (phase {phase!r}, step {step}): {exc}",
            actor=call.actor,
            phase=phase,
            step=step,
        ) from exc
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
    if isinstance(cause, (InputError, PhaseError, VerificationError)):
        # The caller's input (or its timing) was refused, or a transfer arrived different
        # from what was sent (the message names the engine, worker and tensor): the actor
        # itself is healthy; the error is reported as it is.
        raise cause
    raise ActorFailedError(
        f"{call.actor} failed in {call.method} (phase {phase!r}, step {step}): "
        f"{type(cause).__name__}: {cause}",
        actor=call.actor,
        phase=phase,
        step=step,
    ) from cause


_POLL_S = 0.25  # how soon a failed call is noticed while others still run


def wait_all(
    calls: Sequence[Call],
    timeout_s: float,
    refs: Sequence | None = None,
    spans: list | None = None,
) -> list:
    """Starts ``calls`` (unless ``refs`` are given) and returns their results in order.

    One ``ray.wait`` for all of them when all succeed; a failure is noticed within 0.25 s
    while the others still run. When one call fails, the others get a short grace period,
    and an actor that died is reported in preference to a peer that merely lost its
    connection to it: the error names the root cause. Each answer carries the spans its
    actor recorded (``Reply``): they go to ``spans`` when given, those of the calls that
    succeeded also when another failed.

    Raises:
        ActorFailedError: A call failed (dead actor or exception).
        ActorTimeoutError: Some call had not finished after ``timeout_s``.
        InputError: An actor refused the caller's input (re-raised as is).
    """
    refs = list(refs) if refs is not None else [c.start() for c in calls]
    by_ref = dict(zip(refs, calls, strict=True))
    values: dict = {}
    deadline = time.monotonic() + timeout_s
    remaining = list(refs)
    while remaining:
        wait = max(0.0, min(_POLL_S, deadline - time.monotonic()))
        done, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=wait)
        _take(done, remaining, by_ref, values, spans)
        if remaining and time.monotonic() >= deadline:
            late = ", ".join(f"{by_ref[r].actor}.{by_ref[r].method}" for r in remaining)
            first = by_ref[remaining[0]]
            phase, step = first.tag[:2]
            raise ActorTimeoutError(
                f"{late} did not finish within {timeout_s:g} s (phase {phase!r}, step {step})",
                actor=first.actor,
                phase=phase,
                step=step,
            )
    return [values[r] for r in refs]


def _take(done, remaining, by_ref, values: dict, spans: list | None) -> None:
    """Takes the answers of ``done`` (spans to ``spans``); raises the first failure typed."""
    try:
        replies = ray.get(done, timeout=0)  # one call for all: the common case
    except Exception:  # noqa: BLE001 - some failed: look at them one by one
        replies = None
    failures = []
    for i, ref in enumerate(done):
        if replies is not None:
            reply = replies[i]
        else:
            try:
                reply = ray.get(ref, timeout=0)
            except Exception as exc:  # noqa: BLE001 - converted to a typed error naming it
                failures.append((ref, exc))
                continue
        if isinstance(reply, Reply):
            if spans is not None:
                spans.extend(reply.spans)
            reply = reply.value
        values[ref] = reply
    if failures:
        # A dead actor among the failures seen together is the root cause of the others.
        ref, exc = next((f for f in failures if _is_death(f[1])), failures[0])
        _raise_for(*_root_cause(ref, exc, remaining, by_ref))


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


class Chain:
    """Calls submitted together, each running only after the earlier calls it depends on.

    A call waits (as Ray arguments, with no driver round trip) for the calls named in its
    ``after``; calls on one actor also run in the order they were added (Ray runs an actor's
    tasks from one caller in submission order). So a whole step - a hand-over, the work after
    it, the next hand-over - costs the driver one wait. The calls added so far may be started
    early (:meth:`submit`: e.g. the engines' start while the driver still learns an argument of
    the next row); :meth:`run` starts the rest and waits for all.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.refs: list = []  # one result reference per call once run() submitted them
        self._after: list[tuple[int, ...]] = []
        self._sent = 0  # calls submitted so far
        self._step_refs: dict[int, object] = {}  # step -> the Ray reference that answers it
        self._groups: list[list[int]] = []  # the programs submitted, in order
        self._units: list = []  # their Call or _Program
        self._unit_refs: list = []  # their Ray references

    def add(self, call: Call, after: Sequence[int] = ()) -> int:
        """Adds ``call`` (waiting for chain steps ``after``); returns its step index."""
        deps = tuple(dict.fromkeys(after))
        if any(not 0 <= d < len(self.calls) for d in deps):
            raise ValueError(f"{call.actor}.{call.method} depends on a step not in the chain")
        self.calls.append(call)
        self._after.append(deps)
        return len(self.calls) - 1

    def add_handover(
        self, releases: Sequence[Call], acquires: Sequence[Call], prepares: Sequence[Call] = ()
    ) -> list[int]:
        """Adds one transition: each acquisition waits for the releases on its GPUs.

        ``prepares`` (memory-free) wait for nothing, and are added first: an actor runs its
        calls in the order they were added, so its own acquisition in this transition runs
        after its preparation, never before it. Returns the steps of the preparations, the
        releases and the acquisitions, in that order.
        """
        steps = [self.add(c) for c in prepares]
        released = [self.add(c) for c in releases]
        by_lane: dict[int, list[int]] = {}
        for step, c in zip(released, releases, strict=True):
            for lane in c.lanes:
                by_lane.setdefault(lane, []).append(step)
        steps += released
        for c in acquires:
            steps.append(
                self.add(c, sorted({s for lane in c.lanes for s in by_lane.get(lane, [])}))
            )
        return steps

    def programs(self, first: int = 0) -> list[list[int]]:
        """The steps from ``first`` on grouped into one Ray call per group, in submission order.

        Consecutive steps on one actor join a group when the new step waits for nothing
        beyond what the group's first step waits for (or the group itself), and no other step
        waits for the step before it: the group then starts exactly when its first step
        would have, and nothing is delayed by it (so no collective peer can be starved).
        """
        dependents: dict[int, set[int]] = {}
        for step, deps in enumerate(self._after):
            for d in deps:
                dependents.setdefault(d, set()).add(step)
        groups: list[list[int]] = []
        open_group: dict[str, list[int]] = {}  # actor -> its last group
        for step in range(first, len(self.calls)):
            call = self.calls[step]
            group = open_group.get(call.actor)
            if group is not None:
                allowed = set(self._after[group[0]]) | set(group)
                if set(self._after[step]) <= allowed and dependents.get(group[-1], set()) <= {step}:
                    group.append(step)
                    continue
            group = [step]
            groups.append(group)
            open_group[call.actor] = group
        return groups

    def submit(self) -> None:
        """Starts every call added since the last submit (each still waits for its steps).

        Nothing is waited for here; :meth:`run` waits for every call. A call added later runs
        after the submitted calls of its actor; one that depends on a step submitted inside a
        program waits for that whole program (later, never earlier, than the step).
        """
        for group in self.programs(self._sent):
            deps = tuple(dict.fromkeys(d for s in group for d in self._after[s] if d not in group))
            members = [self.calls[s] for s in group]
            unit = members[0] if len(members) == 1 else _Program(tuple(members))
            ref = unit.start(*(self._step_refs[d] for d in deps))
            self._groups.append(group)
            self._units.append(unit)
            self._unit_refs.append(ref)
            for s in group:
                self._step_refs[s] = ref
        self._sent = len(self.calls)

    def run(self, timeout_s: float, spans: list | None = None) -> list:
        """Submits every call not yet submitted; returns every result, in step order.

        One bounded wait for all of them. The steps of a group (:meth:`programs`) go to their
        actor as one program. The spans the calls' actors recorded go to ``spans`` (see
        :func:`wait_all`).
        """
        self.submit()
        self.refs = [self._step_refs[s] for s in range(len(self.calls))]
        answers = wait_all(self._units, timeout_s, refs=self._unit_refs, spans=spans)
        results: list = [None] * len(self.calls)
        for group, answer in zip(self._groups, answers, strict=True):
            for s, value in zip(group, answer if len(group) > 1 else [answer], strict=True):
                results[s] = value
        return results


@dataclass(frozen=True)
class _Program:
    """Several calls on one actor sent as one (see :meth:`Chain.programs`)."""

    members: tuple[Call, ...]

    @property
    def actor(self) -> str:
        return self.members[0].actor

    @property
    def method(self) -> str:
        return "+".join(c.method for c in self.members)

    @property
    def tag(self) -> Tag:
        return self.members[0].tag

    def start(self, *after: ray.ObjectRef) -> ray.ObjectRef:
        program = tuple((c.method, c.args, c.tag) for c in self.members)
        return self.members[0].handle.invoke_many.remote(program, *after)
