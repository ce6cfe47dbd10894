"""Checkpoints of a whole run, and resuming one.

A run checkpoint (``<out>/checkpoints/step<N>/``) holds the trainer's checkpoint (model and
optimizer states of every rank, as ``Coordinator.save_trainer`` writes them; the critic's too,
where a run has one) and ``run.json``: the next step, the weight version, the driver's RNG
state, the metrics so far and the task's state. It is written into a temporary sibling and
renamed into place, and ``<out>/checkpoints/latest`` names the newest: a run killed while
saving leaves the previous checkpoint intact.
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
        trainer: Directory of the trainer's checkpoint.
        extra: Other checkpoints by role (e.g. ``{"critic": path}``).
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
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step{state.next_step}"
    tmp = root / f".tmp-step{state.next_step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    paths = save_trainers(tmp)
    state.trainer = str(final / Path(paths["trainer"]).name)
    state.extra = {k: str(final / Path(v).name) for k, v in paths.items() if k != "trainer"}
    (tmp / RESUME_FILE).write_text(json.dumps(asdict(state)))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest = root / "latest"
    (root / ".latest.tmp").write_text(final.name)
    (root / ".latest.tmp").replace(latest)
    return final


def load_run(path: Path) -> RunState:
    """The state of a run checkpoint: ``path`` is a run's output directory or a checkpoint.

    Raises:
        FileNotFoundError: No checkpoint there (the message says what was looked for).
    """
    path = Path(path)
    if not (path / RESUME_FILE).is_file():
        latest = path / "checkpoints" / "latest"
        if not latest.is_file():
            raise FileNotFoundError(
                f"{path}: no {RESUME_FILE} and no checkpoints/latest; fix: pass a run directory "
                "written with --save-every, or one of its checkpoints/step<N> directories"
            )
        path = path / "checkpoints" / latest.read_text().strip()
    data = json.loads((path / RESUME_FILE).read_text())
    return RunState(**data)


def capture_rng(rng: random.Random | None = None) -> list:
    """The state of ``rng`` (default: the ``random`` module's), as JSON-friendly lists."""
    version, internal, gauss = (rng or random).getstate()
    return [version, list(internal), gauss]
