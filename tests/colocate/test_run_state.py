"""Run checkpoints: atomic, relocatable, and readable after a kill at any point of a save."""

import json
import os
import random
from pathlib import Path

import pytest

from colocate.operations.run_state import RESUME_FILE, RunState, capture_rng, load_run, save_run

pytestmark = pytest.mark.fast


def _trainers(directory: Path) -> dict:
    (directory / "trainer").mkdir()
    (directory / "trainer" / "rank0.pt").write_text("weights")
    return {"trainer": str(directory / "trainer")}


def _state(step: int) -> RunState:
    rng = random.Random(step)
    return RunState(step, step + 1, capture_rng(rng), [{"step": s} for s in range(step)])


def test_a_saved_run_loads_from_another_directory_after_being_moved(tmp_path, monkeypatch):
    save_run(tmp_path / "run", _state(3), _trainers)
    (tmp_path / "run").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    state = load_run(Path("."))
    assert state.next_step == 3 and state.weight_version == 4
    assert Path(state.trainer).is_absolute()
    assert (Path(state.trainer) / "rank0.pt").read_text() == "weights"
    assert random.Random(0).getstate() != state.random_state()
    assert random.Random(3).getstate() == state.random_state()


def test_latest_naming_a_missing_checkpoint_falls_back_to_the_newest_complete(tmp_path):
    save_run(tmp_path, _state(2), _trainers)
    save_run(tmp_path, _state(4), _trainers)
    (tmp_path / "checkpoints" / "latest").write_text("step6")  # killed mid re-save of 6
    assert load_run(tmp_path).next_step == 4


def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path):
    save_run(tmp_path, _state(2), _trainers)

    def broken(directory: Path) -> dict:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_run(tmp_path, _state(4), broken)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step2"]
    assert load_run(tmp_path).next_step == 2


def test_no_checkpoint_and_a_foreign_run_json_are_refused_with_a_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="fix: pass a run directory"):
        load_run(tmp_path)
    (tmp_path / RESUME_FILE).write_text(json.dumps({"nope": 1}))
    with pytest.raises(ValueError, match="not a run checkpoint.*fix: pass a run directory"):
        load_run(tmp_path)
