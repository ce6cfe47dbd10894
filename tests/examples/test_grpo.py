"""The GRPO example learns through the weight sync, and only through it; same seed, same run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
STEPS = 14


def _run(out: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "examples/grpo_colocated.py", "--quiet", "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GRPO done" in proc.stdout
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("synced"), "--steps", str(STEPS))


def test_reward_rises_through_the_sync(synced):
    rewards = synced["rewards"]
    late = sum(rewards[-3:]) / 3
    assert synced["initial_reward"] < 0.03
    assert late > 4 * synced["initial_reward"] and late > 0.05, rewards
    assert synced["weight_version"] == STEPS + 1
    assert synced["ordering_violations"] == []
    # start-up measured from start() to ready, beside the engine plus trainer start-up spans
    assert 0 < synced["startup_seconds"] < synced["total_seconds"]
    assert synced["startup_span_sum_seconds"] > 0
    out = Path(synced["out"])
    for name in ("metrics.jsonl", "timeline.json", "timeline.png", "reward_curve.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))
    # Each rollout ran on the weights of the previous step's sync.
    assert [r["sync/weight_version_used"] for r in rows] == list(range(1, STEPS + 1))
    trace = json.loads((out / "timeline.json").read_text())
    assert {e["name"] for e in trace["traceEvents"]} >= {"engine.sleep", "trainer.reload"}


def test_no_rise_without_the_sync(synced, tmp_path):
    control = _run(tmp_path, "--steps", str(STEPS), "--no-sync")
    late = sum(control["rewards"][-3:]) / 3
    assert control["weight_version"] == 1  # only the start-up sync
    assert late < 2.5 * control["initial_reward"] + 0.01, control["rewards"]
    assert late < sum(synced["rewards"][-3:]) / 3 / 2


def test_same_seed_same_rewards(synced, tmp_path):
    again = _run(tmp_path, "--steps", "4")
    assert again["rewards"] == synced["rewards"][:4]


def test_async_pipeline_learns_with_bounded_staleness(tmp_path):
    """Separate pools, one-step off-policy: rollouts overlap training, staleness stays 1."""
    run = _run(
        tmp_path,
        *("--steps", "20", "--pipeline", "async", "--trainer-gpus", "1", "--engine-gpus", "1"),
        *("--zero-stage", "1"),
    )
    rewards = run["rewards"]
    late = sum(rewards[-3:]) / 3
    assert late > 6 * run["initial_reward"] and late > 0.08, rewards
    assert run["max_staleness"] == 1.0 and run["ordering_violations"] == []
    rows = [json.loads(x) for x in (Path(run["out"]) / "metrics.jsonl").read_text().splitlines()]
    # Batch k (k >= 1) was generated with the weights after step k - 1: one step stale.
    assert [r["sync/weight_version_used"] for r in rows] == [1] + list(range(1, 20))
    assert run["topology"]["pipeline"] == "async" and not run["topology"]["colocated"]


def test_partial_pipeline_learns_on_the_same_gpus(tmp_path):
    """``--pipeline partial``: groups stay in flight across hand-overs; the same target."""
    run = _run(tmp_path, "--steps", str(STEPS), "--pipeline", "partial")
    rewards = run["rewards"]
    late = sum(rewards[-3:]) / 3
    assert late > 4 * run["initial_reward"] and late > 0.05, rewards
    assert run["ordering_violations"] == [] and run["topology"]["colocated"]
    assert run["partial"]["completion_max_staleness"] <= 2 and run["partial"]["dropped"] == 0
    assert run["weight_version"] == STEPS + 1


def test_kl_to_a_reference_still_learns_packed(synced, tmp_path):
    """``--kl-coef 0.05`` adds the reference role and the KL term; the target is the same.

    With ``--max-tokens-per-micro-batch`` the trainer and the reference run on packed
    sequences (no padding), in token-budget micro-batches.
    """
    run = _run(
        tmp_path,
        *("--steps", str(STEPS), "--kl-coef", "0.05", "--max-tokens-per-micro-batch", "512"),
    )
    rewards = run["rewards"]
    late = sum(rewards[-3:]) / 3
    assert late > 4 * run["initial_reward"] and late > 0.05, rewards
    assert run["roles"] == ["engine", "reference", "trainer"] and run["kl"] > 0
    assert run["ordering_violations"] == []
    rows = [json.loads(x) for x in (Path(run["out"]) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["actor/kl"] < 1e-6  # the reference is the starting policy
    assert rewards[0] == synced["rewards"][0]  # same seed, same first rollout
    assert all(r["actor/padding_fraction"] == 0 and r["actor/micro_batches"] >= 2 for r in rows)
    padded = [
        json.loads(x) for x in (Path(synced["out"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["actor/padding_fraction"] > 0 for r in padded)
