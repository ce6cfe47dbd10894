"""The PPO example: five kinds of tenant on two GPUs, ordered, and it learns on its defaults."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *extra: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "examples/ppo_colocated.py", "--quiet", "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PPO done" in proc.stdout
    return json.loads((out / "summary.json").read_text()), proc.stdout


def test_ppo_learns_with_every_tenant_colocated_and_packed(tmp_path):
    # the defaults (30 steps on 2 logical GPUs), every tenant's forwards on packed sequences
    summary, _ = _run(tmp_path, "--max-tokens-per-micro-batch", "512")
    assert summary["max_tokens_per_micro_batch"] == 512
    assert summary["roles"] == ["critic", "engine", "reference", "reward", "trainer"]
    assert summary["ordering_violations"] == []
    assert summary["reward_model"]["heldout_corr"] > 0.9, summary["reward_model"]
    first, final = summary["initial_reward"], summary["final_reward"]
    assert final >= 0.6 and final >= 10 * first, summary["rewards"]
    assert summary["kl"] > 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["actor/kl"] < 1e-6  # before the first update the policy is the reference
    assert all(r["actor/padding_fraction"] == 0 for r in rows)
    values = [r["critic/vf_loss"] for r in rows]
    assert min(values[-5:]) < values[0], values  # the critic learns
    for name in ("timeline.json", "timeline.png", "reward_curve.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    trace = json.loads((tmp_path / "timeline.json").read_text())
    names = {e["name"] for e in trace["traceEvents"]}
    assert {"role.offload", "role.reload", "critic.train", "reference.logprobs"} <= names
    print(f"PPO: {first:.3f} -> {final:.3f} in {summary['total_seconds']:.0f} s")


def test_bad_ppo_flags_exit_2_before_anything_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "examples/ppo_colocated.py", "--lam", "1.5", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--lam" in proc.stderr and "1.5" in proc.stderr, proc.stderr
