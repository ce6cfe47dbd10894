"""Checkpoints of a whole run, and resuming one.

A run checkpoint (``<out>/checkpoints/step<N>/``) holds the trainer's checkpoint (model and
optimizer states of every rank, as ``Coordinator.save_trainer`` writes them; the critic's too,
where a run has one) and ``run.json``: the next step, the weight version, the driver's RNG
state, the metrics so far and the task's state. It is written into a temporary sibling and
renamed into place, and ``<out>/checkpoints/latest`` names the newest: a run killed while
saving leaves the previous checkpoint intact (and if ``latest`` names one a kill removed,
the newest complete one is read). Paths inside are stored relative to the checkpoint, so a
run directory can be moved or reached from another working directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["RunState", "save_run", "load_run", "capture_rng", "RESUME_FILE"]

RESUME_FILE = "run.json"


@dataclass
class RunState:
    """What a run needs to continue where it stopped.

    Attributes:
        next_step: The first step still to run.
        weight_version: The engines' weight version when the checkpoint was taken.
        rng: The state of the driver's prompt sampler (:func:`capture_rng`).
        history: Metrics of every step done.
        task: The task's own state (e.g. its seed).
        trainer: The trainer's checkpoint: its name inside the run checkpoint as saved, an
            absolute path once :func:`load_run` read it.
        extra: Other checkpoints by role (e.g. ``{"critic": ...}``), stored the same way.
    """

    next_step: int
    weight_version: int
    rng: list
    history: list = field(default_factory=list)
    task: dict = field(default_factory=dict)
    trainer: str = ""
    extra: dict = field(default_factory=dict)

    def random_state(self) -> tuple:
        """The RNG state in the form ``random.setstate`` takes."""
        version, internal, gauss = self.rng
        return (version, tuple(internal), gauss)


def save_run(out: Path, state: RunState, save_trainers) -> Path:
    """Writes a run checkpoint for ``state`` under ``out/checkpoints``; returns its directory.

    Args:
        out: The run's output directory.
        state: The run's state (``trainer``/``extra`` are filled in here).
        save_trainers: ``save_trainers(directory) -> dict`` writes the trainers' checkpoints
            into ``directory`` and returns role -> path (``"trainer"`` at least).
    """
    root = Path(out).resolve() / "checkpoints"  # absolute: the trainers' cwd may differ
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step{state.next_step}"
    tmp = root / f".tmp-step{state.next_step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        paths = save_trainers(tmp)
        # Names inside the checkpoint, not paths: the run directory may move, or be reached
        # from another working directory (load_run rebases them).
        state.trainer = Path(paths["trainer"]).name
        state.extra = {k: Path(v).name for k, v in paths.items() if k != "trainer"}
        (tmp / RESUME_FILE).write_text(json.dumps(asdict(state)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)  # a re-save of this step (load_run falls back)
    tmp.rename(final)
    latest = root / "latest"
    (root / ".latest.tmp").write_text(final.name)
    (root / ".latest.tmp").replace(latest)
    return final


def _newest_complete(root: Path) -> Path | None:
    done = [d for d in root.glob("step*") if (d / RESUME_FILE).is_file()]
    return max(done, key=lambda d: int(d.name[4:]) if d.name[4:].isdigit() else -1, default=None)


def load_run(path: Path) -> RunState:
    """The state of a run checkpoint: ``path`` is a run's output directory or a checkpoint.

    ``checkpoints/latest`` names the newest checkpoint; if a kill left it naming one that is
    gone, the newest complete ``step<N>`` is taken. Paths in the state are absolute.

    Raises:
        FileNotFoundError: No checkpoint there (the message says what was looked for).
        ValueError: A ``run.json`` that is not one this module wrote.
    """
    path = Path(path).resolve()
    if not (path / RESUME_FILE).is_file():
        root = path / "checkpoints"
        latest = root / "latest"
        named = root / latest.read_text().strip() if latest.is_file() else None
        found = named if named and (named / RESUME_FILE).is_file() else _newest_complete(root)
        if found is None:
            raise FileNotFoundError(
                f"{path}: no {RESUME_FILE} and no checkpoints/step<N> holding one; fix: pass a "
                "run directory written with --save-every, or one of its checkpoints/step<N>"
            )
        path = found
    try:
        state = RunState(**json.loads((path / RESUME_FILE).read_text()))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path / RESUME_FILE}: not a run checkpoint ({exc}); fix: pass a run directory "
            "written with --save-every, or one of its checkpoints/step<N>"
        ) from exc
    state.trainer = str(path / Path(state.trainer).name)
    state.extra = {k: str(path / Path(v).name) for k, v in state.extra.items()}
    return state


def capture_rng(rng: random.Random | None = None) -> list:
    """The state of ``rng`` (default: the ``random`` module's), as JSON-friendly lists."""
    version, internal, gauss = (rng or random).getstate()
    return [version, list(internal), gauss]
