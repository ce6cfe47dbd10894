"""The custom-topology example runs both of its pools end to end (public names only)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]


def test_custom_topology_example_runs_both_pools():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "examples/custom_topology.py", "--steps", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for pool, colocated in (("separate", False), ("colocated", True)):
        # Every step ends in a verified sync that bumps the weight version.
        synced = re.findall(
            rf"\[{pool}\] step (\d): .* synced v(\d) \(.*, (\d+) tensors verified\)", proc.stdout
        )
        assert [(int(s), int(v)) for s, v, _ in synced] == [(0, 2), (1, 3)], proc.stdout[-3000:]
        assert all(int(n) > 0 for *_, n in synced)
        assert f"[{pool}] done: colocated={colocated}, ordering violations: []" in proc.stdout
    # The user's own tenant scored the colocated run, one rank beside each trainer rank.
    assert "[colocated] rewards from the user's tenant: ['judge0', 'judge1']" in proc.stdout
