"""Rollouts in flight and the staleness of what is trained on (one-step off-policy pipelining).

``Coordinator.generate_async`` submits a generate to every engine and returns a
:class:`Rollout` at once; the engines' own call queues then order it with the next sync (an
engine receives new weights only after the rollout it is generating). :class:`VersionLedger`
remembers which trainer step each weight version carries, so every batch's staleness (the
optimizer steps between the weights that generated it and the weights it is trained on) is
known from the versions its completions are stamped with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["Rollout", "VersionLedger", "StalenessError"]


class StalenessError(ValueError):
    """A batch generated with weights older than the pipeline's ``max_staleness`` allows."""


class Rollout:
    """Completions being generated; :meth:`result` waits for them (bounded).

    Args:
        wait: Waits for the engines' answers and returns the completions (raising the typed
            error of a failed engine, which leaves the pipeline FAILED).
    """

    def __init__(self, wait: Callable[[], list]):
        self._wait = wait
        self._result: list | None = None

    def result(self) -> list:
        """The completions, in prompt order (``prompt_index`` global); waits if needed."""
        if self._result is None:
            self._result = self._wait()
        return self._result


class VersionLedger:
    """Which trainer step (optimizer steps taken) each verified weight version carries."""

    def __init__(self) -> None:
        self._step_of: dict[int, int] = {}

    def record(self, version: int, step: int) -> None:
        """Version ``version`` left the trainer after ``step`` optimizer steps."""
        self._step_of[version] = step

    def staleness(self, versions: Iterable[int], step: int) -> int | None:
        """Steps between the oldest of ``versions`` and a trainer at ``step``; None if unknown."""
        known = [self._step_of[v] for v in set(versions) if v in self._step_of]
        return step - min(known) if known else None

    def batch_staleness(self, batch: dict, step: int, bound: int | None) -> int | None:
        """The staleness of ``batch`` (from its ``weight_version`` rows, if any) at ``step``.

        Args:
            batch: A train batch; without a ``weight_version`` column its staleness is unknown.
            step: The trainer's optimizer steps so far.
            bound: The most staleness allowed (``PipelineConfig.max_staleness`` in ASYNC
                mode), or None for no bound.

        Raises:
            StalenessError: Beyond ``bound`` (before anything runs).
        """
        versions = batch.get("weight_version")
        if versions is None:
            return None
        rows = versions.tolist() if hasattr(versions, "tolist") else versions
        versions = [int(v) for v in rows]
        staleness = self.staleness(versions, step)
        if bound is not None and staleness is not None and staleness > bound:
            raise StalenessError(
                f"the batch was generated with weight version {min(versions)}, {staleness} "
                f"optimizer steps behind the trainer (step {step}); "
                f"PipelineConfig.max_staleness={bound}; fix: sync() after every train(), or "
                "raise max_staleness"
            )
        return staleness
