"""The executor of the hand-over table: the owner of the phase, and of every driver wait.

The coordinator decides what to do; the executor does it in order. It plans table rows into a
:class:`~colocate.core.calls.Chain` (each acquisition waiting, on the actors, for the releases on
its GPUs), runs a chain with one bounded driver wait, checks every memory state the actors report
against the table, and only then moves the phase. The coordinator's own timeline spans (one
per driver wait) and the count of sequential driver rounds live here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from colocate.core.calls import Call, Chain, wait_all
from colocate.core.contract import Tag
from colocate.core.errors import ColocateError, InputError
from colocate.core.handovers import Context, Row, plan_handover
from colocate.core.phases import RESIDENT, Phase, PhaseError
from colocate.operations.timeline import Recorder, Timeline
from placement import Plan

__all__ = ["Executor", "Pending"]


@dataclass
class Pending:
    """What a chain being planned will do: the phase it reaches and its rows."""

    phase: Phase
    rows: list = field(default_factory=list)  # (row, planned calls, chain steps)


class Executor:
    """Executes table rows and waits for actors, for one coordinator.

    Args:
        plan: The placement plan (rows are planned on it).
        timeline: Where the actors' spans, and the executor's own, go.
        step_timeout_s: Default bound on one driver wait.
        step: The coordinator's RL step counter (read for every tag).
    """

    def __init__(
        self, plan: Plan, timeline: Timeline, step_timeout_s: float, step: Callable[[], int]
    ):
        self.plan = plan
        self.timeline = timeline
        self.timeout_s = step_timeout_s
        self.phase = Phase.INIT
        self.fleet = None  # set once the coordinator created it
        #: Sequential driver rounds so far (each one set of calls and one wait): a loop step
        #: (generate, train, sync) costs 3.
        self.rounds = 0
        self.recorder = Recorder("coordinator", (), memory=False)
        self._step = step
        self._seq = 0  # hand-over sequence number: one per tag

    def fail(self) -> None:
        """Marks the pipeline FAILED: an actor died or a call failed; ``recover`` must run."""
        self.phase = Phase.FAILED

    def close(self) -> None:
        """Marks the pipeline SHUTDOWN: its actors are gone and nothing more may run."""
        self.phase = Phase.SHUTDOWN

    def tag(self, name: str) -> Tag:
        """A fresh tag (name, step, sequence number) for the calls of one hand-over or op."""
        self._seq += 1
        return (name, self._step(), self._seq)

    @contextlib.contextmanager
    def span(self, name: str, tag: Tag, **detail) -> Iterator[dict]:
        """A span of the coordinator's own (no GPU lane): what a benchmark times it by."""
        with self.recorder.span(name, tag, **detail) as d:
            yield d

    def pending(self) -> tuple[Chain, Pending]:
        """A new chain, and what it will do, starting from the current phase."""
        return Chain(), Pending(self.phase)

    def add_row(self, chain: Chain, row: Row, ctx: Context, pending: Pending) -> None:
        """Plans ``row`` into ``chain`` from the phase the chain has reached (pure, no Ray).

        The row must start from that phase (already in its target with no row looping there:
        nothing to add). Each acquisition waits for the releases on its GPUs; each preparation
        waits for nothing.
        """
        if pending.phase not in row.sources:
            if pending.phase is row.target:
                return
            allowed = " or ".join(repr(p.value) for p in sorted(row.sources, key=str))
            raise PhaseError(
                f"{row.name} needs phase {allowed}, but the pipeline is in "
                f"{pending.phase.value!r}"
                + ("; call recover() first" if pending.phase is Phase.FAILED else "")
            )
        planned = plan_handover(row, self.plan, ctx, pending.phase)
        tag = self.tag(row.name)

        def calls(items) -> list[Call]:
            return [self.fleet.call(c.actor, c.verb, *c.args, tag=tag) for c in items]

        steps = chain.add_handover(
            calls(planned.releases), calls(planned.acquires), calls(planned.prepares)
        )
        pending.rows.append((row, [*planned.prepares, *planned.releases, *planned.acquires], steps))
        pending.phase = row.target

    def wait(self, calls, timeout_s: float | None = None) -> list:
        """One driver round: starts ``calls`` and waits for all of them (bounded).

        The spans the actors recorded come back with the answers and go to the timeline.
        """
        self.rounds += 1
        spans: list = []
        try:
            return wait_all(calls, timeout_s or self.timeout_s, spans=spans)
        finally:
            self.timeline.extend(spans)

    def run_chain(self, chain: Chain, pending: Pending, name: str, timeout_s=None) -> list:
        """Runs a planned chain: one driver wait, then the table's checks, then the phase.

        Order: (1) every call is submitted at once (Ray orders them: releases before
        acquisitions per GPU, each actor's calls in the order added); (2) one bounded wait
        (the actors' spans come back with their answers and go to the timeline); (3) every
        memory state the actors report is checked against the table; (4) the phase becomes
        the last row's target. A failure raises here (the caller's guard leaves FAILED; an
        actor's refusal of its input leaves FAILED here if the chain moved memory).
        """
        tag = self.tag(name)
        spans: list = []
        try:
            with self.span(name, tag, rows=[r.name for r, _, _ in pending.rows]):
                self.rounds += 1
                results = chain.run(timeout_s or self.timeout_s, spans)
        except (InputError, PhaseError):
            if pending.rows:  # an actor refused after some hand-overs ran: states unknown
                self.phase = Phase.FAILED
            raise
        finally:
            self.timeline.extend(spans)
            self.timeline.extend(self.recorder.drain())
        for row, planned, steps in pending.rows:
            self.check_resident(row, planned, [results[i] for i in steps])
        self.phase = pending.phase
        return results

    def run(self, row: Row, ctx: Context, timeout_s: float | None = None) -> list:
        """Executes one row of the hand-over table on its own (start-up and recovery).

        Returns:
            The preparations' results, then the releases', then the acquisitions'.
        """
        chain, pending = Chain(), Pending(self.phase)
        self.add_row(chain, row, ctx, pending)
        if not pending.rows:
            return []
        return self.run_chain(chain, pending, "handover", timeout_s)

    def check_resident(self, row: Row, planned, results) -> None:
        """Raises if a memory state an actor reports is not what ``row``'s target phase needs."""
        want = RESIDENT.get(row.target, {})
        for call, got in zip(planned, results, strict=True):
            expected = call.expect or want.get(call.actor.kind)
            if expected is not None and type(got) is type(expected) and got is not expected:
                raise ColocateError(
                    f"{call.actor.name} reports memory {got.value!r} after {call.verb.__name__} "
                    f"in row {row.name!r}, but phase {row.target.value!r} needs "
                    f"{expected.value!r}: the actor breaks the tenant contract",
                    actor=call.actor.name,
                    phase=row.name,
                    step=self._step(),
                )
