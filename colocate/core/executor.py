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

from colocate.core.calls import Call, Chain, wait_all
from colocate.core.contract import Tag
from colocate.core.errors import ColocateError, InputError
from colocate.core.fleet import Fleet
from colocate.core.handovers import Context, Row, plan_handover
from colocate.core.phases import RESIDENT, Phase, PhaseError
from colocate.operations.timeline import Recorder, Timeline
from placement import Plan

__all__ = ["Executor", "Step"]


class Step(Chain):
    """One driver round being built: a chain of calls, the phase it reaches and its rows.

    Rows of the hand-over table (:meth:`row`) and plain calls (:meth:`add`) go into one chain;
    :meth:`run` executes it with one bounded driver wait. Made by :meth:`Executor.step`.

    Args:
        executor: The executor that plans its rows and runs it.
        fleet: The actors its rows' calls go to.
    """

    def __init__(self, executor: Executor, fleet: Fleet):
        super().__init__()
        self.executor = executor
        self.fleet = fleet
        self.phase = executor.phase  # the phase reached once every row added so far ran
        self.rows: list = []  # (row, planned calls, chain steps)

    def row(self, row: Row, ctx: Context) -> Step:
        """Plans ``row`` into this step (see :meth:`Executor.add_row`); returns the step."""
        self.executor.add_row(self, row, ctx)
        return self

    def run(self, name: str, timeout_s: float | None = None) -> list:  # type: ignore[override]
        """Executes the step (see :meth:`Executor.run_step`); returns every call's result."""
        return self.executor.run_step(self, name, timeout_s)


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

    def step(self, fleet: Fleet) -> Step:
        """A new driver round over ``fleet``, starting from the current phase."""
        return Step(self, fleet)

    def add_row(self, step: Step, row: Row, ctx: Context) -> None:
        """Plans ``row`` into ``step`` from the phase the step has reached (pure, no Ray).

        The row must start from that phase (already in its target with no row looping there:
        nothing to add). Each acquisition waits for the releases on its GPUs; each preparation
        waits for nothing.
        """
        if step.phase not in row.sources:
            if step.phase is row.target:
                return
            allowed = " or ".join(repr(p.value) for p in sorted(row.sources, key=str))
            raise PhaseError(
                f"{row.name} needs phase {allowed}, but the pipeline is in "
                f"{step.phase.value!r}"
                + ("; call recover() first" if step.phase is Phase.FAILED else "")
            )
        planned = plan_handover(row, self.plan, ctx, step.phase)
        tag = self.tag(row.name)

        def calls(items) -> list[Call]:
            return [step.fleet.call(c.actor, c.verb, *c.args, tag=tag) for c in items]

        steps = step.add_handover(
            calls(planned.releases), calls(planned.acquires), calls(planned.prepares)
        )
        step.rows.append((row, [*planned.prepares, *planned.releases, *planned.acquires], steps))
        step.phase = row.target

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

    def run_step(self, step: Step, name: str, timeout_s: float | None = None) -> list:
        """Runs a planned step: one driver wait, then the table's checks, then the phase.

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
            with self.span(name, tag, rows=[r.name for r, _, _ in step.rows]):
                self.rounds += 1
                results = Chain.run(step, timeout_s or self.timeout_s, spans)
        except (InputError, PhaseError):
            if step.rows:  # an actor refused after some hand-overs ran: states unknown
                self.phase = Phase.FAILED
            raise
        finally:
            self.timeline.extend(spans)
            self.timeline.extend(self.recorder.drain())
        for row, planned, steps in step.rows:
            self.check_resident(row, planned, [results[i] for i in steps])
        self.phase = step.phase
        return results

    def run(self, fleet: Fleet, row: Row, ctx: Context, timeout_s: float | None = None) -> list:
        """Executes one row of the hand-over table on its own (start-up and recovery).

        Returns:
            The preparations' results, then the releases', then the acquisitions'.
        """
        step = self.step(fleet).row(row, ctx)
        return step.run("handover", timeout_s) if step.rows else []

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
