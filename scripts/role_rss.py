"""Measures the RSS of a frozen role's rank: the memory plan's CPU fixed cost of a role.

Starts a local Ray (2 logical GPUs), one ``ReferenceActor`` and one ``RewardModelActor`` rank
of the tiny model, each in its own Ray worker: ``start``, ``reload``, one forward of 16 rows x
64 tokens, then reads the rank's ``status()``. Prints one JSON line. CPU figures (RSS counts
shared library pages in every process: an upper side), not GPU measurements.

Usage: ``flock /tmp/stack.lock .venv/bin/python scripts/role_rss.py`` (~20 s once Ray is up).
"""

from __future__ import annotations

import json
import tempfile

import ray
import torch

from colocate import build_tiny_model, init_reward_model
from colocate.core.contract import Seat
from colocate.roles.reference import ReferenceActor, ReferenceConfig
from colocate.roles.reward_model import RewardModelActor, RewardModelConfig


def main() -> dict:
    """Measures both ranks; returns and prints their RSS in bytes."""
    model = str(build_tiny_model())
    rm = str(init_reward_model(model, tempfile.mkdtemp() + "/rm"))
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    batch = {
        "input_ids": torch.randint(3, 100, (16, 64)),
        "attention_mask": torch.ones(16, 64, dtype=torch.long),
    }
    out = {}
    try:
        for name, cls, config in (
            ("reference", ReferenceActor, ReferenceConfig(model)),
            ("reward", RewardModelActor, RewardModelConfig(rm)),
        ):
            rank = ray.remote(num_cpus=0.1, num_gpus=0.1)(cls).remote(
                Seat(name, 0, 1, (0,), config)
            )
            before = ray.get(rank.status.remote(), timeout=120)
            ray.get(rank.start.remote(), timeout=120)
            ray.get(rank.reload.remote(), timeout=60)
            forward = rank.logprobs if cls is ReferenceActor else rank.scores
            ray.get(forward.remote(batch), timeout=120)
            after = ray.get(rank.status.remote(), timeout=60)
            out[name] = {
                "rss_before_start": before["rss_bytes"],
                "rss_after_forward": after["rss_bytes"],
                "peak_rss": after["peak_rss_bytes"],
            }
            ray.kill(rank)
    finally:
        ray.shutdown()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
