"""`examples/grpo_minimal.py`, the README's first example, runs and learns."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]


def test_minimal_example_learns():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "examples/grpo_minimal.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rewards = [float(x) for x in re.findall(r"^step \d+: reward ([0-9.]+)", proc.stdout, re.M)]
    assert len(rewards) == 20
    assert rewards[0] < 0.03 and sum(rewards[-3:]) / 3 > 0.1, rewards
    assert len((ROOT / "examples/grpo_minimal.py").read_text().splitlines()) <= 80
