"""The static memory plan: arithmetic per ZeRO stage, phases, checks, and the pre-launch refusal.

Pure tests (no Ray) except the last, which starts a real local Ray and checks that the
coordinator refuses a model that cannot fit before any actor exists.
"""

import json
import shutil
import time
from dataclasses import replace

import pytest

from colocate import Coordinator, EngineConfig, LoadFormat, TrainerConfig, grpo_loss
from colocate.config import ConfigError, DType, SyncConfig, ZeroStage
from colocate.memory_check import settings_for
from colocate.memory_plan import (
    FIXED,
    GIB,
    BundleMemory,
    MemoryPlanError,
    MemorySettings,
    ModelShape,
    Pool,
    check_plan,
    model_shape,
    plan_memory,
)
from colocate.memory_plan_cli import main as plan_cli
from colocate.phases import PhaseError
from placement import DeviceKind, TopologySpec, plan

P = 1_000_000
SHAPE = ModelShape(
    params=P,
    layers=4,
    hidden=256,
    heads=4,
    kv_heads=2,
    head_dim=64,
    vocab=1000,
    largest_layer_params=P // 8,
)


def _items(phase):
    return {(i.where.value, i.name): i.bytes for i in phase.items}


def _phase(memory, name, pool=Pool.SHARED):
    (found,) = [p for p in memory.of(pool) if p.phase == name]
    return _items(found)


@pytest.mark.parametrize(
    "stage,params,grads,optim",
    [(0, 4 * P, 4 * P, 8 * P), (1, 4 * P, 4 * P, 2 * P), (2, 4 * P, P, 2 * P), (3, P, P, 2 * P)],
)
def test_fp32_trainer_state_per_zero_stage(stage, params, grads, optim):
    s = MemorySettings(trainer_ranks=4, zero_stage=stage, train_dtype_bytes=4, cuda=False)
    train = _phase(plan_memory(SHAPE, s), "train")
    assert train[("trainer", "params")] == params
    assert train[("trainer", "grads")] == grads
    assert train[("trainer", "optimizer states")] == optim
    assert (("trainer", "ZeRO-3 gathered layers") in train) is (stage == 3)


@pytest.mark.parametrize("stage,state_bytes_per_param", [(0, 2 + 6 + 12), (3, (2 + 6 + 12) / 4)])
def test_bf16_keeps_fp32_master_weights_and_grads(stage, state_bytes_per_param):
    s = MemorySettings(trainer_ranks=4, zero_stage=stage, train_dtype_bytes=2, cuda=False)
    train = _phase(plan_memory(SHAPE, s), "train")
    state = sum(train[("trainer", k)] for k in ("params", "grads", "optimizer states"))
    assert state == state_bytes_per_param * P


def test_activations_are_34sbh_per_layer_in_16_bit_and_twice_that_in_fp32():
    logits = 8 * 512 * SHAPE.vocab
    for w, per_layer in ((2, 34 * 512 * 256), (4, 68 * 512 * 256)):
        s = MemorySettings(train_dtype_bytes=w, seq_len=512, cuda=False)
        acts = _phase(plan_memory(SHAPE, s), "train")[("trainer", "activations (estimate)")]
        assert acts == per_layer * SHAPE.layers + logits
        s = replace(s, activation_checkpointing=True)
        acts = _phase(plan_memory(SHAPE, s), "train")[("trainer", "activations (estimate)")]
        assert acts == w * 512 * 256 * SHAPE.layers + per_layer + logits


@pytest.mark.parametrize("kv", [0, -1, 1.5, True])
def test_a_kv_cache_size_that_is_not_a_positive_int_is_refused(kv):
    with pytest.raises(ConfigError, match=r"MemorySettings.kv_cache_bytes=.*fix"):
        MemorySettings(kv_cache_bytes=kv)


def test_trainer_state_matches_the_h200_measurement():
    # docs/gpu-results.md: the trainer actor's ZeRO-3 engine (bf16, FusedAdam, one rank) on
    # 16 x Linear(4096, 4096) held 5.36 GB allocated after a step.
    mlp = replace_params(SHAPE, 16 * (4096 * 4096 + 4096))
    s = MemorySettings(trainer_ranks=1, zero_stage=3, train_dtype_bytes=2, cuda=True)
    train = _phase(plan_memory(mlp, s), "train")
    state = sum(train[("trainer", k)] for k in ("params", "grads", "optimizer states"))
    assert abs(state - 5.36e9) / 5.36e9 < 0.01


def replace_params(shape, params):
    from dataclasses import replace

    return replace(shape, params=params)


def test_cuda_phases_keep_only_what_each_needs():
    s = MemorySettings(
        trainer_ranks=2, zero_stage=3, kv_cache_bytes=1 << 20, bucket_bytes=1 << 20, cuda=True
    )
    memory = plan_memory(SHAPE, s)
    rollout, train, sync = (_phase(memory, n) for n in ("rollout", "train", "sync"))
    assert rollout[("engine", "KV cache")] == 1 << 20 and rollout[("engine", "weights")] == 2 * P
    assert not [k for k in rollout if k[0] == "trainer" and k[1] != "fixed per process"]
    assert ("engine", "weights") not in train and ("engine", "KV cache") not in train
    assert ("engine", "CUDA graphs") in train  # graphs stay resident across sleep
    assert ("engine", "KV cache") not in sync and ("trainer", "grads") not in sync
    assert sync[("trainer", "send buffers")] == 2 * s.bucket_bytes
    assert ("engine", "receive buffers") not in sync  # CUDA IPC maps the sender's buffers
    assert memory.peak().phase == "train"


def test_cpu_phases_count_what_never_leaves_host_memory():
    level1 = MemorySettings(kv_cache_bytes=64 << 20, cuda=False, sleep_level=1)
    level2 = MemorySettings(kv_cache_bytes=64 << 20, cuda=False, sleep_level=2)
    rollout = _phase(plan_memory(SHAPE, level1), "rollout")
    assert rollout[("trainer", "optimizer states")] > 0  # an "offload" moves nothing on CPU
    assert ("engine", "weights") in _phase(plan_memory(SHAPE, level1), "train")
    assert ("engine", "weights") not in _phase(plan_memory(SHAPE, level2), "train")
    assert ("engine", "receive buffers") in _phase(plan_memory(SHAPE, level1), "sync")
    assert rollout[("engine", "fixed per process")] == FIXED[(False, "engine")]


def test_kv_cache_from_gpu_memory_utilization():
    s = MemorySettings(gpu_memory_utilization=0.5, kv_cache_bytes=None, cuda=True)
    rollout = _phase(plan_memory(SHAPE, s, capacity=80 * GIB), "rollout")
    assert rollout[("engine", "KV cache")] == 40 * GIB - 2 * P - FIXED[(True, "engine")]
    big = replace_params(SHAPE, 30 * 10**9)  # 60 GB of bf16 weights in a 0.5 x 80 GiB budget
    with pytest.raises(MemoryPlanError, match="gpu_memory_utilization=0.5.*fix: raise"):
        plan_memory(big, s, capacity=80 * GIB)


def test_check_names_phase_gpu_and_largest_items():
    seven_b = replace_params(SHAPE, 7 * 10**9)
    s = MemorySettings(trainer_ranks=2, train_dtype_bytes=2, kv_cache_bytes=GIB, cuda=True)
    memory = plan_memory(seven_b, s)
    gpus = [BundleMemory(f"bundle {i} (H200)", Pool.SHARED, 141 * GIB) for i in range(2)]
    check_plan(memory, gpus)  # ~84 GiB at its peak: fits in 141
    small = [BundleMemory("bundle 1 (A100)", Pool.SHARED, 40 * GIB)]
    with pytest.raises(MemoryPlanError) as err:
        check_plan(memory, small)
    msg = str(err.value)
    assert "phase 'train'" in msg and "bundle 1 (A100)" in msg and "40.00 GiB of device" in msg
    assert "trainer optimizer states" in msg and "fix:" in msg
    # Separate pools: an engine GPU never holds trainer state.
    check_plan(memory, [BundleMemory("engine gpu", Pool.ENGINE, 20 * GIB)])


def test_cpu_bundles_of_a_node_share_its_host_memory():
    s = MemorySettings(trainer_ranks=4, kv_cache_bytes=GIB, cuda=False)
    memory = plan_memory(SHAPE, s)
    one = memory.peak().total
    node = [BundleMemory(f"bundle {i}", Pool.SHARED, int(3.5 * one), "n1") for i in range(4)]
    with pytest.raises(MemoryPlanError, match=r"node n1 \(4 bundles share.*host memory \(CPU"):
        check_plan(memory, node)
    check_plan(memory, [*node[:2], *[BundleMemory("b", Pool.SHARED, 4 * one, "n2")] * 2])


def test_settings_come_from_the_run_configs(tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=1, engine_tp=2)
    engine = EngineConfig(model=tiny_model_dir, tensor_parallel_size=2, max_model_len=256)
    trainer = TrainerConfig(model=tiny_model_dir, zero_stage=ZeroStage.ZERO2, dtype=DType.FLOAT32)
    s = settings_for(engine, trainer, SyncConfig(), plan(spec), DeviceKind.CPU, 2)
    assert (s.trainer_ranks, s.engine_tp, s.zero_stage, s.train_dtype_bytes) == (2, 2, 2, 4)
    assert (s.seq_len, s.micro_batch, s.bucket_bytes, s.cuda) == (256, 1, 32 << 20, False)
    assert s.sleep_level == 2 and s.enforce_eager and s.kv_cache_bytes == engine.kv_cache_bytes


def test_model_shape_counts_the_real_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    shape = model_shape(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layers == model.config.num_hidden_layers


def test_cli_prints_the_table_and_refuses_what_cannot_fit(tiny_model_dir, capsys):
    assert plan_cli(["--model", tiny_model_dir, "--gpus", "2", "--device-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "trainer: optimizer states" in out and "fits: every phase within 80 GiB" in out
    assert plan_cli(["--model", tiny_model_dir, "--device-gib", "0.5", "--kv-cache-gib", "1"]) == 1
    assert "does not fit: phase 'rollout'" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        plan_cli(["--model", "/nonexistent"])
    assert exit_.value.code == 2


@pytest.mark.timeout(300)
def test_coordinator_refuses_a_model_that_cannot_fit_before_any_actor(
    ray_local, tiny_model_dir, tmp_path
):
    import ray

    huge = tmp_path / "huge"
    shutil.copytree(tiny_model_dir, huge)
    config = json.loads((huge / "config.json").read_text())
    # ~100B parameters: fp32 ZeRO-3 state is ~800 GB per rank pair, past any host's memory.
    config.update(hidden_size=12288, intermediate_size=49152, num_hidden_layers=56)
    config.update(num_attention_heads=192, num_key_value_heads=8, head_dim=64)
    (huge / "config.json").write_text(json.dumps(config))
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    engine = EngineConfig(model=str(huge), load_format=LoadFormat.DUMMY)
    coord = Coordinator(spec, engine, TrainerConfig(model=str(huge)), grpo_loss, name="huge")
    t0 = time.monotonic()
    with pytest.raises(MemoryPlanError, match=r"phase '.*' needs .* host memory \(CPU run\)"):
        coord.start()
    assert time.monotonic() - t0 < 60
    assert coord.fleet is None  # the fleet (every actor) comes after the check
    assert coord.reservation is None  # the GPUs were given back at once
    deadline = time.monotonic() + 30
    while ray.available_resources().get("GPU", 0) < ray.cluster_resources()["GPU"]:
        assert time.monotonic() < deadline, "the refused run's GPUs were not given back"
        time.sleep(0.2)
    with pytest.raises(PhaseError, match="nothing to recover; fix: create a new Coordinator"):
        coord.recover()  # FAILED, but no actor ever existed
    coord.shutdown()
