"""The run's summary from its metrics rows: rewards, KL, staleness, partial rollouts, the
time of each part of the steps this process ran, the console line (pure: no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from colocate.runner.data import PromptData
from colocate.runner.recipe import load_recipe
from colocate.runner.summary import headline, summarize

pytestmark = pytest.mark.fast


def _prepared(tmp_path, resumed: bool):
    config = load_recipe(
        None,
        ["model.path=tiny", "data.train=x.jsonl", "reward.functions=[m:f]", "steps=7"]
        + [f"out={tmp_path}"],
    )
    train = PromptData(rows=[{}] * 12, filtered=3)
    return SimpleNamespace(
        config=config, train=train, eval=None, state=object() if resumed else None
    )


def _row(step: int, **extra) -> dict:
    return {
        "step": step,
        "reward": 0.1 * step,
        "timing_s/gen": 1.0,
        "timing_s/train": 2.0,
        "timing_s/step": 3.5,
        "training/off_policy/logprob_diff": 0.01 * step,
        **extra,
    }


FACTS = {
    "weight_version": 8,
    "ordering_violations": [],
    "roles": ["engine", "reference", "trainer"],
    "accelerator": {"device": "cpu"},
    "memory_plan": {"shared/train": 1},
    "startup_span_sum_seconds": 4.0,
    "startup_seconds": 3.0,
    "setup_seconds": 5.0,
    "total_seconds": 30.0,
    "eval": [],
    "exports": [],
    "epochs_started": 1,
}


def test_rewards_kl_staleness_and_the_time_of_this_process_steps(tmp_path):
    history = [
        _row(s, **{"actor/kl": 0.5 * s, "training/off_policy/staleness": float(s % 2)})
        for s in range(7)
    ]
    summary = summarize(_prepared(tmp_path, resumed=True), history, 4, FACTS)
    assert summary["initial_reward"] == 0.0
    assert summary["final_reward"] == pytest.approx(sum(0.1 * s for s in range(2, 7)) / 5)
    assert summary["rewards"] == [r["reward"] for r in history]
    assert summary["kl"] == pytest.approx(sum(0.5 * s for s in range(2, 7)) / 5)
    assert summary["logprob_diff"] == pytest.approx(0.06)
    assert summary["max_staleness"] == 1.0
    assert summary["resumed_from"] == 4 and summary["steps"] == 7
    # steps 4, 5 and 6 ran here; the step's own total is not a part
    assert summary["phase_seconds"] == {"gen": 3.0, "train": 6.0}
    assert summary["data"] == {"train_rows": 12, "eval_rows": 0, "filtered": 3, "epochs_started": 1}
    assert summary["roles"] == ["engine", "reference", "trainer"]
    assert summary["memory_plan"] == {"shared/train": 1} and summary["startup_seconds"] == 3.0
    assert "partial" not in summary and "epochs_started" not in summary


def test_partial_rollouts_and_a_run_without_a_reference(tmp_path):
    prefix = "training/off_policy/"
    history = [
        _row(s, **{f"{prefix}partial_fraction": 0.25 * s, f"{prefix}max_staleness": s})
        | {f"{prefix}dropped": 0.0}
        for s in range(3)
    ]
    summary = summarize(_prepared(tmp_path, resumed=False), history, 0, FACTS)
    assert summary["partial"] == {
        "completion_max_staleness": 2,
        "partial_fraction": 0.25,
        "dropped": 0.0,
    }
    assert "kl" not in summary and summary["resumed_from"] is None
    assert summary["max_staleness"] == 0.0  # no step reported one


def test_the_console_line(tmp_path):
    summary = summarize(_prepared(tmp_path, resumed=False), [_row(0), _row(1)], 0, FACTS)
    line = headline(summary, "runs/x", "GRPO")
    assert line == (
        "GRPO done: reward 0.000 -> 0.050 (mean of the last 2 steps) in 7 steps, 30 s; "
        "weight version 8; outputs in runs/x/"
    )
