"""DeepSpeed's ops: built once per environment, never rebuilt at run time, and a lock left by a
killed build never hangs a later trainer (it is cleared; a live holder is named after a bound)."""

import subprocess
import sys
import time

import pytest
import ray

from colocate import TrainerConfig, lm_loss
from colocate.actors.cpu.ds_ops import extensions_dir, op_environment
from colocate.actors.trainer import TrainerActor
from colocate.core.contract import Seat

pytestmark = pytest.mark.timeout(300)


def _snapshot() -> dict:
    root = extensions_dir()
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".so", ".o")
    }


@pytest.mark.fast
def test_every_op_loading_process_uses_this_environments_ninja_and_cache():
    env = op_environment()
    assert env["PATH"].split(":")[0] == f"{sys.prefix}/bin"  # the venv's ninja, always
    assert env["TORCH_EXTENSIONS_DIR"] == str(extensions_dir())
    assert str(extensions_dir()).startswith(sys.prefix) or "TORCH_EXTENSIONS_DIR" in env


def test_a_stale_lock_is_cleared_and_a_trainer_starts_without_rebuilding(ray_local, tiny_model_dir):
    before = _snapshot()
    assert any(name.endswith("fused_adam.so") for name in before), "set-up built the ops"
    stale = extensions_dir() / "fused_adam" / "lock"
    stale.write_text("")  # what a build killed half-way leaves behind
    actor = ray.remote(TrainerActor).options(num_gpus=0.5, num_cpus=0.1)
    config = TrainerConfig(model=tiny_model_dir, zero_stage=1)
    trainer = actor.remote(Seat("trainer", 0, 1, (0,), config, {"DS_ACCELERATOR": "cpu"}, lm_loss))
    try:
        t0 = time.monotonic()
        master = ray.get(trainer.host_group_store.remote(False, 60), timeout=60)
        ray.get(trainer.start.remote(master, 60), timeout=240)
        assert time.monotonic() - t0 < 120
    finally:
        ray.get(trainer.shutdown.remote(), timeout=60)
        ray.kill(trainer)
    assert not stale.exists()
    assert _snapshot() == before  # nothing was compiled


@pytest.mark.fast
def test_a_live_holder_of_the_build_lock_is_named_within_the_bound(tmp_path):
    lock = extensions_dir() / ".colocate-build.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, time; f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX);"
            " print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "from colocate.actors.cpu.ds_ops import prepare_ops; prepare_ops(timeout_s=2)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.monotonic() - t0 < 30
        assert probe.returncode != 0
        assert "OpsLockError" in probe.stderr and str(lock) in probe.stderr
        assert "fix:" in probe.stderr
    finally:
        holder.kill()
        holder.wait()
