"""The timeline: every step of every actor, with start/end times and memory readings.

Actors record :class:`Span` objects locally (a :class:`Recorder`); the coordinator drains them
after each transition and adds its own spans, then exports a Chrome trace (opens in Perfetto)
and a PNG with one lane per GPU. Times are wall-clock seconds (``time.time()``), comparable
across processes of one machine; across nodes they carry the nodes' clock skew.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from colocate.operations.memory import MemoryReading, read_memory

__all__ = ["Span", "Recorder", "Timeline", "RELEASE_STEPS", "ACQUIRE_STEPS", "PREPARE_STEPS"]

# Steps that give memory back and steps that take it, as named in spans; the ordering checks
# (and the tests) use these to verify "every release before every acquisition" per GPU.
RELEASE_STEPS = frozenset(
    {"engine.sleep", "trainer.offload", "trainer.offload_params", "role.offload"}
)
ACQUIRE_STEPS = frozenset(
    {
        "engine.wake_weights",
        "engine.wake_kv",
        "trainer.reload",
        "engine.start",
        "trainer.start",
        "role.reload",
        "role.start",
    }
)

# Steps that neither take nor give back device memory, run beside the hand-overs (the trainer's
# memory-free start-up part): never an acquisition, so never an ordering violation.
PREPARE_STEPS = frozenset({"trainer.prepare"})

#: The rows of the start-up (``colocate.core.handovers.START`` and ``INIT``).
_STARTUP_ROWS = ("start", "init")


@dataclass(frozen=True)
class Span:
    """One step of one actor (or of the coordinator).

    Attributes:
        actor: Who did it, e.g. ``"engine0"``, ``"trainer1"``, ``"coordinator"``.
        lanes: GPU lanes (bundle indices) it concerns; empty for the coordinator's own spans.
        name: The step, e.g. ``"engine.sleep"``, ``"trainer.train_step"``, ``"transition"``.
        phase: The pipeline phase being entered or run.
        step: The RL step counter when it ran.
        start: Wall-clock start (s).
        end: Wall-clock end (s).
        memory_before: Reading before the step.
        memory_after: Reading after the step.
        detail: Free-form small facts (sizes, levels).
        seq: The coordinator's hand-over sequence number (0 for calls made directly).
    """

    actor: str
    lanes: tuple[int, ...]
    name: str
    phase: str
    step: int
    start: float
    end: float
    memory_before: MemoryReading | None = None
    memory_after: MemoryReading | None = None
    detail: dict = field(default_factory=dict)
    seq: int = 0

    @property
    def seconds(self) -> float:
        """Duration."""
        return self.end - self.start


class Recorder:
    """Collects spans inside an actor until the coordinator drains them.

    Args:
        actor: Who records.
        lanes: GPU lanes of every span it records.
        memory: Read memory before and after each span (off for the coordinator: the driver
            holds no GPU memory, and the reading costs two system calls per span).
    """

    def __init__(self, actor: str, lanes: tuple[int, ...], memory: bool = True):
        self.actor = actor
        self.lanes = lanes
        self.memory = memory
        self._spans: list[Span] = []

    @contextlib.contextmanager
    def span(self, name: str, tag: tuple, **detail) -> Iterator[dict]:
        """Records ``name`` around the block under ``tag`` = (phase, step[, sequence number]).

        The yielded dict can take more detail while the block runs.
        """
        before = read_memory() if self.memory else None
        start = time.time()
        try:
            yield detail
        finally:
            end = time.time()
            self._spans.append(
                Span(
                    self.actor,
                    self.lanes,
                    name,
                    tag[0],
                    tag[1],
                    start,
                    end,
                    before,
                    read_memory() if self.memory else None,
                    dict(detail),
                    tag[2] if len(tag) > 2 else 0,
                )
            )

    def drain(self) -> list[Span]:
        """Returns and forgets the recorded spans."""
        spans, self._spans = self._spans, []
        return spans


class Timeline:
    """All spans of a run, in the order they were collected."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def extend(self, spans: list[Span]) -> None:
        """Adds spans drained from an actor."""
        self.spans.extend(spans)

    def lanes(self) -> list[int]:
        """Every GPU lane that appears."""
        return sorted({lane for s in self.spans for lane in s.lanes})

    def on_lane(self, lane: int) -> list[Span]:
        """Spans of one GPU, by start time."""
        return sorted((s for s in self.spans if lane in s.lanes), key=lambda s: s.start)

    def ordering_violations(self) -> list[str]:
        """Per GPU, each acquisition that started before a release of the same hand-over ended.

        A hand-over is one transition: the spans tagged with its row, step and sequence number.
        (SYNC -> ROLLOUT holds the trainer's params offload and the engine's KV wake-up;
        start-up is ``start`` (engine created, trainer prepared) then ``init`` (engine sleeps,
        trainer takes its memory).) Preparations (:data:`PREPARE_STEPS`) are neither releases
        nor acquisitions.
        Returns human-readable descriptions; empty means every release ended before any
        acquisition began, on every GPU.
        """
        problems = []
        for lane in self.lanes():
            groups: dict[tuple[str, int, int], list[Span]] = {}
            for s in self.on_lane(lane):
                groups.setdefault((s.phase, s.step, s.seq), []).append(s)
            for (phase, step, _), spans in groups.items():
                releases = [s for s in spans if s.name in RELEASE_STEPS]
                acquires = [s for s in spans if s.name in ACQUIRE_STEPS]
                for a in acquires:
                    for r in releases:
                        if a.start < r.end:
                            problems.append(
                                f"gpu{lane} {phase} step {step}: {a.actor} {a.name} started "
                                f"{r.end - a.start:.4f} s before {r.actor} {r.name} ended"
                            )
        return problems

    def busiest(self, names: frozenset[str], phases: tuple[str, ...]) -> float:
        """Seconds the busiest actor spent in spans named ``names`` tagged with ``phases``.

        Per actor the durations add up (e.g. a trainer rank's ``trainer.prepare`` and
        ``trainer.start``); the largest actor's sum is returned (0 if none).
        """
        per_actor: dict[str, float] = {}
        for s in self.spans:
            if s.name in names and s.phase in phases:
                per_actor[s.actor] = per_actor.get(s.actor, 0.0) + s.seconds
        return max(per_actor.values(), default=0.0)

    def startup_span_sum(self) -> float:
        """Engine start plus trainer start, as if one ran after the other (seconds).

        The slowest engine's ``engine.start`` plus the slowest trainer rank's start-up
        (``trainer.prepare`` and ``trainer.start``), in the start-up rows: what the start-up
        costs when the trainers wait for the engines, to compare its wall time with.
        """
        trainer = frozenset({"trainer.start", *PREPARE_STEPS})
        return self.busiest(frozenset({"engine.start"}), _STARTUP_ROWS) + self.busiest(
            trainer, _STARTUP_ROWS
        )

    def to_chrome_trace(self, path: str | Path) -> Path:
        """Writes a Chrome trace JSON (one process per GPU lane, one thread per actor)."""
        events = []
        pids = {lane: lane + 1 for lane in self.lanes()}
        for lane, pid in pids.items():
            events.append(
                {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"GPU {lane}"}}
            )
        for s in self.spans:
            for pid in [pids[lane] for lane in s.lanes] or [0]:
                args = {"phase": s.phase, "step": s.step, **s.detail}
                if s.memory_after is not None:
                    args["memory_kind"] = s.memory_after.kind
                    args["memory_after_bytes"] = s.memory_after.used_bytes
                events.append(
                    {
                        "ph": "X",
                        "name": s.name,
                        "cat": s.phase,
                        "pid": pid,
                        "tid": s.actor,
                        "ts": s.start * 1e6,
                        "dur": max(s.seconds, 0.0) * 1e6,
                        "args": args,
                    }
                )
                if s.memory_after is not None:
                    events.append(
                        {
                            "ph": "C",
                            "name": f"{s.actor} {s.memory_after.kind} bytes",
                            "pid": pid,
                            "ts": s.end * 1e6,
                            "args": {"bytes": s.memory_after.used_bytes},
                        }
                    )
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        return path

    def to_json(self) -> list[dict]:
        """Spans as plain dicts."""
        return [asdict(s) for s in self.spans]

    def to_png(self, path: str | Path, title: str = "") -> Path:
        """Draws one lane per GPU (steps coloured by phase) and memory over time below it."""
        from colocate.operations._plot import plot_timeline

        return plot_timeline(self, Path(path), title)
