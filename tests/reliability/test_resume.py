"""An interrupted run resumes: SIGKILL the GRPO example's driver mid-run, then ``--resume``.

The example runs as a user runs it (its own local Ray, in a subprocess). After the kill the
next run starts while the killed run's Ray processes may still be exiting: it must not care.
The resumed run's metrics (JSONL and TensorBoard) hold every step exactly once, the step after
the checkpoint rolls out with the resumed weights (one verified sync past the saved version),
and the curve joins up.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 12, 4
pytestmark = pytest.mark.timeout(900)


def _grpo(out: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "examples/grpo_colocated.py", "--steps", str(STEPS), "--quiet"]
    cmd += ["--prompts", "8", "--group-size", "4", "--out", str(out), *extra]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its Ray's processes are in its group: cleaned up at the end
    )


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cleanup(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_sigkill_mid_run_then_resume_logs_every_step_once(tmp_path, report):
    out = tmp_path / "run"
    first = _grpo(out, "--save-every", str(EVERY))
    try:
        deadline = time.monotonic() + 600
        while len(_lines(out / "metrics.jsonl")) < EVERY + 2:
            assert first.poll() is None, first.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGKILL)  # the driver only, as `kill -9 <pid>` would
        first.wait(timeout=60)
        killed_after = len(_lines(out / "metrics.jsonl"))
        latest = (out / "checkpoints" / "latest").read_text().strip()
        saved = json.loads((out / "checkpoints" / latest / "run.json").read_text())
        second = _grpo(out, "--resume", str(out), "--save-every", str(EVERY))
        try:
            output, _ = second.communicate(timeout=600)
        finally:
            _cleanup(second)
        assert second.returncode == 0, output[-4000:]
    finally:
        _cleanup(first)
    rows = _lines(out / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == list(range(STEPS)), steps
    summary = json.loads((out / "summary.json").read_text())
    resumed = summary["resumed_from"]
    assert resumed == saved["next_step"] and resumed % EVERY == 0 and resumed <= killed_after
    # The history before the checkpoint is the killed run's own, and the first resumed step
    # rolled out with the resumed weights: one verified sync past the saved version.
    assert rows[:resumed] == saved["history"]
    assert rows[resumed]["sync/weight_version_used"] == saved["weight_version"] + 1
    assert summary["weight_version"] == saved["weight_version"] + 1 + (STEPS - resumed)
    assert summary["ordering_violations"] == []
    assert summary["final_reward"] > summary["initial_reward"]

    # TensorBoard: grouped names, and the killed run's events past the checkpoint are purged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"rollout/reward", "actor/loss", "timing_s/sync", "sync/weight_version"} <= tags
    reward_steps = [e.step for e in events.Scalars("rollout/reward")]
    assert sorted(reward_steps) == list(range(STEPS)), reward_steps
    report.setdefault("resume", []).append(
        {
            "how": "SIGKILL of the driver of `examples/grpo_colocated.py`, then `--resume`",
            "killed_after_step": killed_after - 1,
            "resumed_from": resumed,
            "steps_logged": f"0..{STEPS - 1}",
            "each_once": steps == list(range(STEPS)),
            "final_reward": summary["final_reward"],
        }
    )
