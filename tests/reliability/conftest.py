"""One colocated pipeline shared by the reliability tests of this package (it gets broken and
recovered on purpose), and a place to leave figures for docs/reliability.md."""

import json
import os
from pathlib import Path

import pytest
from raysupport import ensure_local_ray

from colocate import Coordinator, EngineConfig, SyncConfig, TrainerConfig, grpo_loss
from placement import TopologySpec


@pytest.fixture(scope="package")
def pipeline(tiny_model_dir):
    ensure_local_ray()
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    coord = Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir),
        TrainerConfig(model=tiny_model_dir, lr=1e-3),
        grpo_loss,
        sync=SyncConfig(bucket_bytes=128 << 10, timeout_s=20),
    )
    coord.start()
    yield coord
    coord.shutdown()


@pytest.fixture(scope="session")
def report():
    """Collects facts for docs/reliability.md when COLOCATE_REPORT_DIR is set."""
    facts: dict = {}
    yield facts
    out = os.environ.get("COLOCATE_REPORT_DIR")
    if out and facts:
        path = Path(out) / f"facts-{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(facts, indent=2, default=str))
