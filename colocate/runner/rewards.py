"""Reward functions named by the recipe, run concurrently off the driver under a timeout.

``reward.functions`` lists ``"pkg.module:fn"`` (imported) or ``"path/to/file.py:fn"`` (a file,
relative to the current directory) specs. Every function is called with keyword arguments::

    fn(prompt: str, completion: str, completion_ids: list[int], row: dict, **kwargs)
        -> float | dict

``row`` is the prompt's dataset row (a copy per call), ``kwargs`` come from
``reward.kwargs[<function name>]`` (the part of the spec after ``:``; when two specs share a
name the second is ``name#2``, and so on). It returns a real number (int, float, bool or a
numpy scalar), or a dict holding ``"score"`` (the reward) and other named numbers, which are
logged as ``<name>/<key>``. The reward of a completion is ``sum(weight_i * score_i)`` (the
reward model's term is added by the loop).

The order of the steps:

1. :func:`colocate.runner.reward_specs.check_functions`, in the driver before Ray starts:
   loads every function, refuses a spec that does not load, ``reward.kwargs`` that name no
   function, and a function whose signature does not take the keyword arguments (a
   :class:`RecipeError` each).
2. :meth:`RewardScorer.start`: ``reward.workers`` Ray actors (``num_cpus=0``), each loading the
   functions once (the driver's directory on its ``sys.path``; file paths made absolute).
3. :meth:`RewardScorer.submit`: the items go out in one chunk per worker; it returns at once.
4. :meth:`PendingScores.result`: collects the chunks (each wait bounded), counts the errors
   by function and reason, applies ``reward.on_error`` and replaces any worker that hung or
   died.

Errors: a call that raised (``raised``), took longer than ``reward.timeout_s`` (``timeout``),
returned a NaN or an infinity (``non_finite``), or something other than a number or a dict with
a numeric ``"score"`` (``bad_type``). With ``on_error=fail`` :meth:`PendingScores.result`
raises :class:`RewardError` naming the row, the function, the reason and the message; with
``zero`` the function scores 0 for that item; with ``drop`` too, and the item's index is in
:attr:`Scores.failed` so the loop drops its group. Every error is counted in
:attr:`Scores.errors` whatever ``on_error`` says.

A worker calls an item's functions at once, each in a thread of its own. A hung call cannot
be stopped in its thread: the worker abandons it after ``timeout_s`` (the item counts a
``timeout``), finishes its chunk, and the scorer kills and replaces that worker before the next
submit. A worker that dies, or gives no answer within ``timeout_s`` per item of its chunk plus
a margin, loses its chunk: each of its items counts a ``timeout`` for every function, and the
worker is replaced. The second bound is the one that catches a call holding the GIL (C code
that never releases it, such as a regular expression backtracking without end): the worker's
own wait cannot run until such a call returns, and a call that returns late, but returns,
counts as scored.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from colocate.runner import _reward_worker as worker_module
from colocate.runner.reward_specs import function_names, kwargs_by_name
from colocate.runner.schema import OnError, RewardSection

__all__ = [
    "RewardError",
    "RewardItem",
    "Scores",
    "RewardScorer",
    "PendingScores",
    "REASONS",
]

#: The reasons an error is counted under, in :attr:`Scores.errors` (``"fn/reason"``).
REASONS = (
    worker_module.RAISED,
    worker_module.TIMEOUT,
    worker_module.NON_FINITE,
    worker_module.BAD_TYPE,
)

#: Seconds added to a chunk's bound (``timeout_s`` per item): the call's round trip and a
#: replacement worker's start (a new process importing the reward modules).
MARGIN_S = 30.0

#: Most seconds :meth:`RewardScorer.start` waits for the workers to load the functions.
START_TIMEOUT_S = 120.0


class RewardError(RuntimeError):
    """A reward call failed under ``reward.on_error=fail``.

    Attributes:
        row: The item's index in the submitted list.
        function: The function's name.
        reason: ``raised``, ``timeout``, ``non_finite`` or ``bad_type`` (``start`` when the
            workers could not load the functions).
        errors: Every error of the batch, counted by ``"fn/reason"``.
    """

    def __init__(
        self,
        message: str,
        row: int | None = None,
        function: str | None = None,
        reason: str | None = None,
        errors: dict[str, int] | None = None,
    ):
        super().__init__(message)
        self.row = row
        self.function = function
        self.reason = reason
        self.errors = dict(errors or {})


@dataclass(frozen=True)
class RewardItem:
    """One completion to score.

    Attributes:
        prompt: The prompt's text (as given to the engine).
        completion: The completion's text.
        completion_ids: The completion's token ids.
        row: The prompt's dataset row.
    """

    prompt: str
    completion: str
    completion_ids: tuple[int, ...]
    row: dict


@dataclass
class Scores:
    """The functions' scores of a batch of items.

    Attributes:
        total: Per item: ``sum_i weight_i * score_i`` over the functions (the reward model's
            term is the loop's).
        per_function: Function name -> per-item score (0.0 where an error was handled by
            zeroing; also 0.0 under ``drop``, whose items the loop drops).
        extra: ``"fn/key"`` -> per-item named numbers from dict returns (None where absent).
        errors: ``"fn/reason"`` -> count, only for the reasons that happened (see
            :data:`REASONS`).
        failed: Indexes of the items with any error (``drop`` drops their groups).
        seconds: Wall time from the submit to the result.
        messages: ``"fn/reason"`` -> the first such error's message (for the log).
    """

    total: list[float]
    per_function: dict[str, list[float]]
    extra: dict[str, list[float | None]]
    errors: dict[str, int]
    failed: set[int]
    seconds: float
    messages: dict[str, str] = field(default_factory=dict)


@functools.cache
def _actor_class():
    import ray

    # No CPU asked: the runner's cluster gives its CPUs to the trainer and the engines, and the
    # workers are mostly idle between batches.
    return ray.remote(num_cpus=0)(worker_module.RewardWorker)


def _absolute(spec: str, cwd: str) -> str:
    module_part, _, attr = spec.rpartition(":")
    if not worker_module.is_file_spec(module_part):
        return spec
    path = Path(module_part)
    if not path.is_absolute():
        path = Path(cwd) / path
    return f"{path.resolve()}:{attr}"


class _Slot:
    """One worker: its actor, whether it must be replaced, its chunks in flight."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.tainted = False
        self.in_flight = 0
        self.busy_until = 0.0  # monotonic time by which its queued chunks should be done


class RewardScorer:
    """The reward functions on ``reward.workers`` Ray actors (see the module docstring).

    Args:
        section: The recipe's ``reward`` section.
        names: The functions' names as :func:`check_functions` returned them (default:
            :func:`~colocate.runner.reward_specs.function_names` of the specs).
        margin_s: Seconds added to each chunk's bound of ``timeout_s`` per item.

    Attributes:
        names: The functions' names.
        weights: The functions' weights.
        replacements: Workers killed and replaced so far (hung, dead or silent).
    """

    def __init__(
        self, section: RewardSection, names: list[str] | None = None, margin_s: float = MARGIN_S
    ):
        self.section = section
        self.names = list(names) if names is not None else function_names(section.functions)
        if len(self.names) != len(section.functions):
            raise ValueError(
                f"{len(self.names)} names for {len(section.functions)} reward functions"
            )
        self.weights = [float(w) for w in section.weights] or [1.0] * len(self.names)
        self._cwd = os.getcwd()
        self._specs = [_absolute(s, self._cwd) for s in section.functions]
        kwargs = kwargs_by_name(section, self.names)
        self._kwargs = [kwargs[n] for n in self.names]
        self._margin_s = margin_s
        self._slots: list[_Slot] = []
        self._next = 0
        self._started = False
        self.replacements = 0

    # ----- workers ----------------------------------------------------------------------------

    def _spawn(self):
        return _actor_class().remote(self._specs, self._kwargs, self._cwd, self.section.timeout_s)

    def start(self) -> None:
        """Creates the workers and waits (bounded) until each has loaded the functions.

        Raises:
            RewardError: A worker could not load the functions (e.g. a module that resolves
                in the driver's environment but not in the workers'), or did not answer within
                :data:`START_TIMEOUT_S`.
        """
        if self._started or not self.names:
            self._started = True
            return
        import ray

        self._slots = [_Slot(self._spawn()) for _ in range(self.section.workers)]
        self._started = True
        refs = [s.handle.ready.remote() for s in self._slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        problems = []
        for ref in refs:
            if ref not in ready:
                problems.append(f"no answer within {START_TIMEOUT_S:g} s")
                continue
            try:
                error = ray.get(ref, timeout=10)
            except Exception as e:  # noqa: BLE001 - a worker that died while loading
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if error is not None:
                problems.append(error)
        if problems:
            self.shutdown()
            raise RewardError(
                f"reward workers could not load the functions: {problems[0]}; fix: make the "
                "modules importable where the workers run (installed, or shipped with "
                "ray job submit --working-dir), or give them as files",
                reason="start",
            )

    def _replace(self, slot: _Slot) -> None:
        if slot not in self._slots:  # shut down since: nothing to replace
            return
        import ray

        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        # Not awaited: the new process loads the functions while the loop generates; the next
        # chunk queues behind its start.
        slot.handle = self._spawn()
        slot.tainted = False
        slot.busy_until = 0.0
        self.replacements += 1

    def _replace_tainted(self) -> None:
        for slot in self._slots:
            # A worker still holding another batch's chunk is replaced once that one is back.
            if slot.tainted and slot.in_flight == 0:
                self._replace(slot)

    def shutdown(self) -> None:
        """Kills the workers (idempotent)."""
        import ray

        for slot in self._slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or Ray already shut down
                pass
        self._slots = []
        self._started = False

    # ----- scoring ----------------------------------------------------------------------------

    def submit(self, items: Sequence[RewardItem]) -> PendingScores:
        """Sends the items to the workers, one chunk per worker; returns at once.

        Tainted workers are replaced first. Chunks go to the workers in turn, so small
        batches submitted one after another spread over them.
        """
        if not self._started:
            self.start()
        self._replace_tainted()
        items = list(items)
        now = time.monotonic()
        chunks = []
        if items and self.names:
            n_chunks = min(len(self._slots), len(items))
            size = math.ceil(len(items) / n_chunks)
            for k, lo in enumerate(range(0, len(items), size)):
                slot = self._slots[(self._next + k) % len(self._slots)]
                part = items[lo : lo + size]
                plain = [(i.prompt, i.completion, tuple(i.completion_ids), i.row) for i in part]
                begin = max(now, slot.busy_until)
                slot.busy_until = begin + self.section.timeout_s * len(part)
                slot.in_flight += 1
                ref = slot.handle.score.remote(plain)
                chunks.append(_Chunk(lo, len(part), slot, slot.handle, ref, slot.busy_until))
            self._next = (self._next + len(chunks)) % len(self._slots)
        return PendingScores(self, len(items), chunks, now)

    def score(self, items: Sequence[RewardItem]) -> Scores:
        """``submit(items).result()``."""
        return self.submit(items).result()


@dataclass
class _Chunk:
    start: int
    size: int
    slot: _Slot
    handle: object
    ref: object
    due: float  # monotonic: the worker's bound for it, before the margin


class PendingScores:
    """A submitted batch; :meth:`result` collects it."""

    def __init__(self, scorer: RewardScorer, n: int, chunks: list[_Chunk], submitted: float):
        self._scorer = scorer
        self._n = n
        self._chunks = chunks
        self._submitted = submitted
        self._scores: Scores | None = None
        self._error: RewardError | None = None

    def result(self) -> Scores:
        """Waits for the chunks (each bounded), then builds the scores and applies on_error.

        A chunk not back within ``timeout_s`` per item plus the margin, or whose worker died,
        counts a ``timeout`` for every function on each of its items, and its worker is
        replaced. A worker that abandoned a hung call is replaced here too (unless it still
        holds another batch's chunk).

        Returns:
            The scores (computed once; a second call returns them again).

        Raises:
            RewardError: Some call failed and ``reward.on_error`` is ``fail``.
        """
        if self._scores is None and self._error is None:
            outcomes = self._collect()
            self._scorer._replace_tainted()
            try:
                self._scores = self._build(outcomes)
            except RewardError as e:
                self._error = e
        if self._error is not None:
            raise self._error
        return self._scores

    def _collect(self) -> list[list[tuple] | None]:
        import ray

        scorer = self._scorer
        outcomes: list[list[tuple] | None] = [None] * self._n
        pending = {c.ref: c for c in self._chunks}
        while pending:
            now = time.monotonic()
            expired = [c for c in pending.values() if now >= c.due + scorer._margin_s]
            for chunk in expired:
                del pending[chunk.ref]
                bound = chunk.due + scorer._margin_s - self._submitted
                self._lose(chunk, outcomes, f"worker gave no result within {bound:.0f} s")
            if not pending:
                break
            wait_s = min(c.due for c in pending.values()) + scorer._margin_s - now
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wait_s))
            for ref in ready:
                chunk = pending.pop(ref)
                try:
                    rows, tainted = ray.get(ref, timeout=10)
                except Exception as e:  # noqa: BLE001 - the worker died or its call failed
                    first = str(e).strip().splitlines()
                    why = f"worker lost: {type(e).__name__}: {first[0] if first else ''}"
                    self._lose(chunk, outcomes, why)
                    continue
                chunk.slot.in_flight -= 1
                if tainted and chunk.slot.handle is chunk.handle:
                    chunk.slot.tainted = True
                for k, row in enumerate(rows):
                    outcomes[chunk.start + k] = row
        # Only items of a scorer without functions were never sent: nothing to score.
        return [row if row is not None else [] for row in outcomes]

    def _lose(self, chunk: _Chunk, outcomes: list, why: str) -> None:
        """A chunk that did not come back: a timeout for each of its calls; a new worker."""
        chunk.slot.in_flight -= 1
        lost = [(worker_module.TIMEOUT, why)] * len(self._scorer.names)
        for k in range(chunk.size):
            outcomes[chunk.start + k] = list(lost)
        if chunk.slot.handle is chunk.handle:  # not replaced yet by another batch's result
            self._scorer._replace(chunk.slot)

    def _build(self, outcomes: list[list[tuple]]) -> Scores:
        scorer = self._scorer
        names, weights = scorer.names, scorer.weights
        per_function = {name: [0.0] * self._n for name in names}
        extra: dict[str, list[float | None]] = {}
        errors: dict[str, int] = {}
        messages: dict[str, str] = {}
        failed: set[int] = set()
        first: tuple[int, str, str, str] | None = None
        for i, row in enumerate(outcomes):
            for name, outcome in zip(names, row, strict=True):
                if outcome[0] == "ok":
                    _, score, extras = outcome
                    per_function[name][i] = score
                    for key, value in extras.items():
                        extra.setdefault(f"{name}/{key}", [None] * self._n)[i] = value
                    continue
                reason, message = outcome
                errors[f"{name}/{reason}"] = errors.get(f"{name}/{reason}", 0) + 1
                messages.setdefault(f"{name}/{reason}", message)
                failed.add(i)
                if first is None:
                    first = (i, name, reason, message)
        total = [
            sum(w * per_function[name][i] for name, w in zip(names, weights, strict=True))
            for i in range(self._n)
        ]
        seconds = time.monotonic() - self._submitted
        if first is not None and scorer.section.on_error is OnError.FAIL:
            i, name, reason, message = first
            spec = scorer.section.functions[names.index(name)]
            n_errors = sum(errors.values())
            raise RewardError(
                f"reward function {name} ({spec}) on row {i}: {reason}: {message} "
                f"({n_errors} failed call(s) in this batch: "
                f"{', '.join(f'{k}={v}' for k, v in sorted(errors.items()))}); fix: fix the "
                "function, or pass reward.on_error=zero (score 0) or reward.on_error=drop "
                "(drop the prompt's group)",
                row=i,
                function=name,
                reason=reason,
                errors=errors,
            )
        return Scores(total, per_function, extra, errors, failed, seconds, messages)
