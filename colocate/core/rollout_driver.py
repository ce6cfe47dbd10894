"""The coordinator's side of generation, for the three pipelines (SYNC, ASYNC, PARTIAL).

SYNC and ASYNC split the prompts into one contiguous chunk per engine and call ``generate``.
PARTIAL keeps a :class:`~colocate.algorithms.partial.RolloutBuffer` on the driver (it outlives
a recovery: the coordinator owns it, not the runtime) and runs rounds of
``EngineTenant.rollout`` until the batch's groups are complete. The abort of the unfinished
requests is the last act of each engine's rollout call, inside ROLLOUT: when the ``train`` row
puts the engines to sleep nothing runs in them, so the hand-over table needs no edge of its
own (``docs/design.md`` section 4c).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from colocate.algorithms.batches import split_contiguous
from colocate.algorithms.partial import RolloutBuffer
from colocate.algorithms.rollouts import Rollout
from colocate.core.calls import Call, wait_all
from colocate.core.config import Pipeline, Sampling
from colocate.core.contract import Completion, EngineTenant, Tag
from colocate.core.errors import InputError
from colocate.core.executor import Executor
from colocate.core.phases import Phase, PhaseError, require
from colocate.core.run_config import RunConfig
from colocate.core.runtime import Progress

__all__ = ["RolloutDriver"]


class RolloutDriver:
    """Generation calls and, in PARTIAL mode, the book of every prompt group.

    Args:
        config: The run's configuration (its pipeline, engines and timeouts).
        executor: The coordinator's executor (tags, spans, bounded waits).
        progress: The run's progress (the engines' weight version).
        timeline: Where an asynchronous rollout's spans go once it is awaited.
    """

    def __init__(self, config: RunConfig, executor: Executor, progress: Progress, timeline):
        self.config = config
        self.exec = executor
        self.progress = progress
        self.timeline = timeline
        self.buffer: RolloutBuffer | None = None  # PARTIAL: made by the first generate
        self._snapshot: dict | None = None  # restored before the first generate
        #: Agent episode groups issued over the run (the next group's id).
        self.episodes_issued = 0
        #: Agent episode groups lost with an engine that was replaced while it held them.
        self.episodes_lost = 0
        self._episode_groups = [0] * config.spec.engines  # per engine, groups not yet returned
        self._episodes_done: list = []  # PARTIAL: finished groups a call returned no room for
        #: PARTIAL: the figures of the last generate (see :meth:`generate_partial`).
        self.stats: dict = {}

    def calls(self, fleet, prompts: Sequence, sampling: Sampling) -> tuple[list[Call], Tag]:
        """One ``generate`` call per engine over contiguous chunks of ``prompts`` (ROLLOUT)."""
        require(self.exec.phase, Phase.ROLLOUT, "generate")
        prompts = list(prompts)
        if not prompts:
            raise InputError("prompts is empty; pass at least one prompt")
        tag = self.exec.tag(Phase.ROLLOUT.value)
        chunks = split_contiguous(prompts, self.config.spec.engines)
        generate = EngineTenant.generate
        calls = [
            fleet.engine_call(e, generate, chunk, sampling, offset, tag=tag)
            for e, (offset, chunk) in enumerate(chunks)
        ]
        return calls, tag

    def generate(
        self, fleet, prompts: Sequence, sampling: Sampling, groups: int | None = None
    ) -> list[Completion]:
        """SYNC/ASYNC: every engine's chunk, in one bounded wait; PARTIAL: see below."""
        if self.config.pipeline.mode is Pipeline.PARTIAL:
            return self.generate_partial(fleet, prompts, sampling, groups)
        if groups is not None:
            raise InputError(
                f"generate(groups={groups}) needs PipelineConfig(mode='partial'); fix: drop it"
            )
        calls, tag = self.calls(fleet, prompts, sampling)
        with self.exec.span("generate", tag):
            results = self.exec.wait(calls, self.config.timeouts.step_s)
        return [c for completions in results for c in completions]

    def evaluate(self, fleet, prompts: Sequence, sampling: Sampling) -> list[Completion]:
        """Every engine's chunk in one bounded wait, whatever the pipeline (ROLLOUT).

        Evaluation runs in the ROLLOUT phase, which the ``rollout`` row reached with the
        trainer offloaded, on the weights the engines serve; in PARTIAL mode it leaves the
        groups in flight as they are (their requests were stopped, their tokens kept).
        """
        calls, tag = self.calls(fleet, prompts, sampling)
        with self.exec.span("evaluate", tag, prompts=len(calls)):
            results = self.exec.wait(calls, self.config.timeouts.step_s)
        return [c for completions in results for c in completions]

    def generate_async(self, fleet, prompts: Sequence, sampling: Sampling, guard) -> Rollout:
        """ASYNC: starts every engine's chunk and returns at once (``guard`` wraps the wait)."""
        if self.config.pipeline.mode is not Pipeline.ASYNC:
            raise PhaseError(
                "generate_async needs PipelineConfig(mode='async') (separate pools); with "
                "mode='sync' call generate()"
            )
        calls, _ = self.calls(fleet, prompts, sampling)
        self.exec.rounds += 1
        refs = [c.start() for c in calls]
        step_s = self.config.timeouts.step_s

        def wait() -> list:
            spans: list = []
            try:
                return guard(lambda: wait_all(calls, step_s, refs=refs, spans=spans))
            finally:
                self.timeline.extend(spans)

        return Rollout(lambda: [c for completions in wait() for c in completions])

    # ----- agent episodes ---------------------------------------------------------------------

    def run_episodes(
        self, fleet, rows: Sequence, agent, sampling: Sampling, groups: int | None = None
    ) -> list:
        """Runs ``sampling.n`` agent episodes per dataset row on the engines (ROLLOUT).

        Each row's group goes to one engine (its episodes share a prompt prefix there); group
        ids are issued in order over the run (``completion.prompt_index``).

        SYNC/ASYNC: contiguous rows per engine, every episode run to its end, in one bounded
        wait. PARTIAL: new groups go to the engines holding the fewest; rounds of calls (one
        bounded wait each), each engine returning its share of ``groups`` finished groups
        (default: one per row) and pausing its other episodes, which resume in a later call
        after the sync (their tokens kept, the newer weights' tokens in their spans). Exactly
        ``groups`` groups come back, the oldest: the shares are rounded up, and finished
        groups beyond ``groups`` are kept here and come back first in the next call.

        Returns:
            ``EpisodeResult`` per episode, group by group (the oldest groups first).
        """
        require(self.exec.phase, Phase.ROLLOUT, "run_episodes")
        from colocate.agents.episode import EpisodeStart

        rows = list(rows)
        partial = self.config.pipeline.mode is Pipeline.PARTIAL
        if groups is not None and not partial:
            raise InputError(
                f"run_episodes(groups={groups}) needs PipelineConfig(mode='partial'); fix: drop it"
            )
        wanted = len(rows) if groups is None else groups
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            raise InputError(f"run_episodes: pass rows (got {len(rows)}) or groups >= 1")
        engines = self.config.spec.engines
        held = self._episode_groups
        starts: list[list] = [[] for _ in range(engines)]
        first = self.episodes_issued
        for i, row in enumerate(rows):
            e = i * engines // len(rows) if not partial else held.index(min(held))
            starts[e] += [EpisodeStart(first + i, s, row) for s in range(sampling.n)]
            held[e] += 1
        self.episodes_issued += len(rows)
        tag = self.exec.tag(Phase.ROLLOUT.value)
        run = EngineTenant.run_episodes
        out: list = list(self._episodes_done)
        with self.exec.span("run_episodes", tag, rows=len(rows)) as detail:
            rounds = 0
            while len(_groups(out)) < wanted:
                need = wanted - len(_groups(out))
                active = [e for e in range(engines) if held[e] or starts[e]]
                if not active:
                    break
                share = -(-need // len(active))
                calls = [
                    fleet.engine_call(
                        e,
                        run,
                        starts[e],
                        sampling,
                        agent,
                        min(held[e], share) if partial else None,
                        tag=tag,
                    )
                    for e in active
                ]
                results = self.exec.wait(calls, self.config.timeouts.step_s)
                starts = [[] for _ in range(engines)]
                for e, got in zip(active, results, strict=True):
                    returned = len({r.completion.prompt_index for r in got})
                    if not returned:
                        # An engine asked for a group returns one unless it holds none: its
                        # paused episodes were lost with it (a recover() replaced it).
                        self.episodes_lost += held[e]
                        returned = held[e]
                    held[e] -= returned
                    out += got
                rounds += 1
            taken = set(sorted(_groups(out))[:wanted])
            self._episodes_done = [r for r in out if r.completion.prompt_index not in taken]
            out = [r for r in out if r.completion.prompt_index in taken]
            detail.update(rounds=rounds, returned=len(out), kept=len(self._episodes_done))
        out.sort(key=lambda r: (r.completion.prompt_index, r.completion.sample_index))
        if partial:
            self.stats = _episode_stats(out, self.episodes_held(), rounds, self.episodes_lost)
        return out

    def evaluate_episodes(self, fleet, rows: Sequence, agent, sampling: Sampling) -> list:
        """Runs ``sampling.n`` episodes per row, each to its end, whatever the pipeline (ROLLOUT).

        For evaluation: contiguous rows per engine in one bounded wait; the episodes paused
        by a PARTIAL ``run_episodes`` are left as they are, and no group id of the run is
        used (``completion.prompt_index`` is the row's index in ``rows``).
        """
        require(self.exec.phase, Phase.ROLLOUT, "evaluate_episodes")
        from colocate.agents.episode import EpisodeStart

        rows = list(rows)
        if not rows:
            raise InputError("evaluate_episodes: rows is empty; pass at least one row")
        engines = self.config.spec.engines
        starts: list[list] = [[] for _ in range(engines)]
        for i, row in enumerate(rows):
            starts[i * engines // len(rows)] += [EpisodeStart(i, s, row) for s in range(sampling.n)]
        tag = self.exec.tag(Phase.ROLLOUT.value)
        run = EngineTenant.run_episodes
        calls = [
            fleet.engine_call(e, run, starts[e], sampling, agent, None, True, tag=tag)
            for e in range(engines)
            if starts[e]
        ]
        with self.exec.span("evaluate_episodes", tag, rows=len(rows)):
            results = self.exec.wait(calls, self.config.timeouts.step_s)
        out = [r for got in results for r in got]
        out.sort(key=lambda r: (r.completion.prompt_index, r.completion.sample_index))
        return out

    def episodes_held(self) -> int:
        """Agent episode groups issued and not yet returned.

        On the engines (paused, or finished beyond an engine's share), or finished and kept
        here for the next call.
        """
        return sum(self._episode_groups) + len(_groups(self._episodes_done))

    # ----- PARTIAL ----------------------------------------------------------------------------

    def _buffer(self, sampling: Sampling) -> RolloutBuffer:
        pipeline = self.config.pipeline
        if self.buffer is None:
            self.buffer = RolloutBuffer(
                sampling.n,
                pipeline.in_flight_groups,
                pipeline.max_staleness,
                pipeline.staleness_policy,
            )
            if self._snapshot is not None:
                self.buffer.restore(self._snapshot)
                self._snapshot = None
        if sampling.n != self.buffer.group_size:
            raise InputError(
                f"Sampling.n={sampling.n}: this partial rollout's groups have "
                f"{self.buffer.group_size} completions (groups in flight would mix); fix: keep n"
            )
        return self.buffer

    def wanted(self) -> int:
        """PARTIAL: prompts to pass to the next generate so ``in_flight_groups`` can run.

        ``in_flight_groups`` less the groups queued, in flight or complete (before the first
        generate: all of them).
        """
        if self.buffer is None:
            return self.config.pipeline.in_flight_groups or 0
        return self.buffer.wanted()

    def generate_partial(
        self, fleet, prompts: Sequence, sampling: Sampling, groups: int | None = None
    ) -> list[Completion]:
        """PARTIAL: queues ``prompts`` (one group each) and returns ``groups`` complete groups.

        Steps: (1) queue the prompts; (2) rounds of ``EngineTenant.rollout`` (all engines in
        one bounded wait per round, whole groups per engine, in-flight groups topped up from
        the queue to ``in_flight_groups``) until ``groups`` groups (default: one per prompt)
        are complete; (3) the oldest complete groups are returned. To keep more in flight
        than a batch, pass more prompts than ``groups`` (:meth:`wanted` says how many).

        A round's answers are kept only once every engine answered: a failed round leaves
        the buffer as it was, and after ``recover()`` the same requests are issued again.
        Fewer groups come back only when every other group was dropped (DROP policy).

        Returns:
            Completions of whole groups, prompt-major (``prompt_index``: the group's id over
            the run; ``weight_versions``: the spans of versions of its tokens).
        """
        require(self.exec.phase, Phase.ROLLOUT, "generate")
        prompts = list(prompts)
        wanted = len(prompts) if groups is None else groups
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            raise InputError(f"generate(groups={groups!r}): pass an int >= 1, or None")
        buffer = self._buffer(sampling)
        if not prompts and not buffer.queued and not buffer.started:
            raise InputError("prompts is empty and no group is in flight; pass prompts")
        buffer.add(prompts)
        version, engines = self.progress.weight_version, self.config.spec.engines
        tag = self.exec.tag(Phase.ROLLOUT.value)

        def run_round(plan) -> list:
            rollout, finish = EngineTenant.rollout, plan.finish
            calls = [
                fleet.engine_call(e, rollout, list(reqs), sampling, q, finish, tag=tag)
                for e, (reqs, q) in enumerate(zip(plan.requests, plan.quotas, strict=True))
                if reqs
            ]
            return self.exec.wait(calls, self.config.timeouts.step_s)

        with self.exec.span("generate", tag, partial=True) as detail:
            rounds = buffer.fill(version, self.progress.step, engines, wanted, run_round)
            out = buffer.take(wanted)
            detail.update(rounds=rounds, **buffer.accounting())
        self.stats = _stats(out, buffer, rounds, version)
        return out

    def snapshot(self) -> dict | None:
        """PARTIAL: the buffer as plain data (None before the first generate)."""
        return self.buffer.snapshot() if self.buffer is not None else self._snapshot

    def restore(self, snapshot: dict | None) -> None:
        """PARTIAL: continues from :meth:`snapshot` (before or after the first generate)."""
        if snapshot is None:
            return
        if self.buffer is not None:
            self.buffer.restore(snapshot)
        else:
            self._snapshot = snapshot


def _groups(results: list) -> set[int]:
    """The prompt groups of episode results."""
    return {r.completion.prompt_index for r in results}


def _stats(out: list[Completion], buffer: RolloutBuffer, rounds: int, version: int) -> dict:
    """Partial fraction, spans per completion, staleness histogram, dropped, the accounting."""
    spans = [c.weight_versions for c in out]
    staleness = Counter(buffer.staleness(s) for s in spans)
    n = max(1, len(out))
    return {
        **buffer.accounting(),  # issued, queued, in_flight, complete, dropped, returned
        "partial_fraction": sum(len(s) > 1 for s in spans) / n,
        "spans_per_completion": sum(len(s) for s in spans) / n,
        "staleness_histogram": dict(sorted(staleness.items())),
        "max_staleness": max(staleness, default=0),
        "dropped_by_reason": dict(buffer.dropped),
        "rounds": rounds,
        "version": version,
        "kept_tokens": buffer.kept_tokens(),  # generated, held for groups not yet returned
    }


def _episode_stats(results: list, held: int, rounds: int, lost: int) -> dict:
    """PARTIAL agent episodes: the partial-rollout figures of the episodes returned.

    ``partial_fraction``: the share whose tokens span more than one weight version (paused
    across a hand-over); ``max_staleness``: the most versions between an episode's oldest and
    newest tokens; ``dropped``: groups lost with a replaced engine, over the run;
    ``in_flight``: groups issued and not returned after the call
    (:meth:`RolloutDriver.episodes_held`).
    """
    spans = [[v for v, _ in r.completion.weight_versions] for r in results]
    n = max(1, len(spans))
    return {
        "partial_fraction": sum(len(set(s)) > 1 for s in spans) / n,
        "max_staleness": max((max(s) - min(s) for s in spans if s), default=0),
        "dropped": lost,
        "in_flight": held,
        "rounds": rounds,
        "returned": len(results),
    }
