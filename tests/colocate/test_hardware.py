"""Device facts come from the bundles: a CUDA answer from the placement probe (faked at the
probe only) gives CUDA environments, CUDA transports and CUDA bucket sizes; a CPU answer the
CPU ones. Nothing starts an actor: this is what the fleet and the sync driver would do."""

import pytest
from raysupport import fake_cuda_probe

from colocate import EngineConfig, SyncConfig, TrainerConfig, grpo_loss
from colocate.core.config import ConfigError, check_engine_model
from colocate.core.fleet import Fleet
from colocate.core.run_config import RunConfig
from colocate.core.syncing import SyncDriver
from placement import DeviceKind, TopologySpec, plan, reserve
from weight_sync import Backend

pytestmark = [
    pytest.mark.fast,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("no_leftover_placement_groups"),
]


def _driver(spec, model, probe=None):
    p = plan(spec)
    res = reserve(p, timeout_s=60, probe=probe)
    engine = EngineConfig(model=model, tensor_parallel_size=spec.engine_tp)
    config = RunConfig(spec, engine, TrainerConfig(model=model), grpo_loss, name="hw")
    fleet = Fleet(config, p, res)
    return res, fleet, SyncDriver(fleet, engine, SyncConfig(), 30.0, "hw")


def test_cuda_bundles_give_the_cuda_environment_transports_and_buckets(ray_local, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=1, engine_tp=2)
    res, fleet, driver = _driver(spec, tiny_model_dir, fake_cuda_probe())
    try:
        assert res.device is DeviceKind.CUDA and fleet.device is DeviceKind.CUDA
        assert fleet.trainer_env() == {
            "DS_ACCELERATOR": "cuda",
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        }
        assert "VLLM_CPU_OMP_THREADS_BIND" not in fleet.engine_env()
        # TP 2 on CUDA: vLLM's Ray executor starts the workers on the engine's bundles.
        launch = res.engine_launch(0)
        assert (
            launch.actor_options["num_gpus"] == 0
            and "VLLM_RAY_BUNDLE_INDICES" in launch.executor_env
        )
        # Each TP worker shares its GPU with a trainer rank: CUDA IPC from that rank.
        assert {g.backend for g in driver.groups} == {Backend.CUDA_IPC}
        assert sorted(g.sender_rank for g in driver.groups) == [0, 1]
        assert driver.bucket_bytes == 512 << 20
        assert res.hardware()["bundles"][0]["memory_kind"] == "device"
    finally:
        res.release()


def test_cuda_separate_pools_use_nccl(ray_local, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=1, engines=1, colocate=False)
    res, _, driver = _driver(spec, tiny_model_dir, fake_cuda_probe())
    try:
        assert [g.backend for g in driver.groups] == [Backend.NCCL]
    finally:
        res.release()


def test_cpu_bundles_give_the_cpu_environment_transports_and_buckets(ray_local, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=1, engine_tp=2)
    res, fleet, driver = _driver(spec, tiny_model_dir)
    try:
        assert res.device is DeviceKind.CPU
        assert fleet.trainer_env() == {"DS_ACCELERATOR": "cpu"}
        assert fleet.engine_env()["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
        assert res.engine_launch(0).executor_env == {}
        assert [g.backend for g in driver.groups] == [Backend.GLOO]
        assert driver.bucket_bytes == 32 << 20
    finally:
        res.release()


def test_the_cpu_head_size_check_follows_the_device(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    config = EngineConfig(model=str(tmp_path))
    check_engine_model(config, DeviceKind.CUDA)  # head_dim 16 is fine on CUDA
    check_engine_model(config)  # and not checked before the reservation knows the device
    with pytest.raises(ConfigError, match="head_dim=16, which the vLLM CPU backend refuses"):
        check_engine_model(config, DeviceKind.CPU)
