"""`examples/agent_tools.py`, multi-turn GRPO with the Python API, runs and learns."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]


def test_agent_example_learns():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "examples/agent_tools.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = re.findall(r"^step \d+: reward ([0-9.]+) loss \S+ turns ([0-9.]+)", proc.stdout, re.M)
    rewards = [float(r) for r, _ in steps]
    assert len(rewards) == 20 and all(float(t) == 2.0 for _, t in steps)
    assert rewards[0] < 0.03 and sum(rewards[-3:]) / 3 > 0.1, rewards
