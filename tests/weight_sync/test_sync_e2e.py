"""Weight sync on the real stack: DeepSpeed ZeRO-3 (2 ranks) -> 2 vLLM CPU engines over gloo."""

import pytest
import ray
import torch

from colocate import (
    Coordinator,
    EngineConfig,
    LoadFormat,
    Phase,
    Sampling,
    SyncConfig,
    TrainerConfig,
    lm_loss,
)
from colocate.actors.engine import EngineActor
from colocate.core.contract import Seat
from placement import TopologySpec
from weight_sync import WeightSyncError

pytestmark = pytest.mark.timeout(900)

GREEDY = Sampling(n=1, max_tokens=16, temperature=0.0)
PROMPTS = ["kato rimu sena", "lo pe vi da", "mu se na", "ri ka to"]


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (4, 32), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": torch.ones(ids.shape, dtype=torch.float32),
    }


def _reference_generate(model_dir, prompts, tp=1):
    """Greedy output of a fresh engine loaded from ``model_dir`` (the reference, not HF).

    Same TP size as the engine under test: TP changes the order of partial sums, and near-ties
    in greedy decoding then pick different tokens.
    """
    actor = ray.remote(EngineActor).options(num_gpus=0.5, num_cpus=0.1)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    config = EngineConfig(model=str(model_dir), tensor_parallel_size=tp)
    ref = actor.remote(Seat("reference", 0, 1, (9,), config, env))
    try:
        ray.get(ref.start.remote(), timeout=300)
        return ray.get(ref.generate.remote(prompts, GREEDY), timeout=120)
    finally:
        ray.kill(ref)


def _tokens(completions):
    return [c.token_ids for c in completions]


@pytest.fixture(scope="module")
def coordinator(ray_local_module, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    coord = Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir),
        TrainerConfig(model=tiny_model_dir, lr=5e-3),
        lm_loss,
        sync=SyncConfig(bucket_bytes=256 << 10),  # several buckets for the tiny model
    )
    coord.start()
    yield coord
    coord.shutdown()


@pytest.fixture
def coord(ray_local, coordinator):
    return coordinator


def test_first_sync_verified_and_engines_serve(coord):
    report = coord.last_sync
    assert coord.phase is Phase.ROLLOUT and coord.weight_version == 1
    n = len(coord.bucket_plan.metas)
    assert report.buckets == len(coord.bucket_plan.buckets) > 2
    assert report.verified_tensors == 2 * n  # both engines, every tensor
    assert report.applied_checked > 0  # embed/norm/lm_head are readable on CPU
    out = coord.generate(PROMPTS, GREEDY)
    assert {c.weight_version for c in out} == {1}


def test_after_training_engine_equals_checkpoint_engine(coord, tmp_path):
    before = coord.generate(PROMPTS, GREEDY)
    for _ in range(3):
        coord.train(_batch())
    report = coord.sync()
    assert report.version == 2 and coord.weight_version == 2
    after = coord.generate(PROMPTS, GREEDY)
    assert {c.weight_version for c in after} == {2}
    assert _tokens(after) != _tokens(before)
    # Prompts 0-1 ran on engine 0, 2-3 on engine 1: both received the one broadcast.
    reference = _reference_generate(coord.export_hf(str(tmp_path / "ckpt")), PROMPTS)
    assert _tokens(after) == _tokens(reference)
    for a, r in zip(after, reference, strict=True):
        assert a.logprobs == pytest.approx(r.logprobs, abs=1e-5)


def test_corrupted_bucket_is_caught_and_recovered(coord):
    fingerprints = coord.trainer_fingerprints()
    coord.train(_batch())
    coord.inject_fault("engine1", "corrupt_next_bucket")
    version = coord.weight_version
    with pytest.raises(
        WeightSyncError, match=r"engine1 worker tp0 .*tensor '.*' arrived corrupted"
    ):
        coord.sync()
    assert coord.phase is Phase.FAILED and coord.weight_version == version
    assert coord.trainer_fingerprints() != fingerprints  # the train step landed; nothing lost
    report = coord.recover()
    assert coord.phase is Phase.ROLLOUT and report.version == version + 1
    assert {c.weight_version for c in coord.generate(PROMPTS, GREEDY)} == {version + 1}


def test_wrong_phase_calls_raise(coord):
    from colocate import PhaseError

    assert coord.phase is Phase.ROLLOUT
    coord.train(_batch())
    with pytest.raises(PhaseError, match="generate needs phase 'rollout'"):
        coord.generate(PROMPTS, GREEDY)
    coord.sync()
    with pytest.raises(PhaseError, match="recover needs phase 'failed'"):
        coord.recover()


def test_dummy_engine_matches_checkpoint_after_first_sync(ray_local, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1)
    with Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir, load_format=LoadFormat.DUMMY),
        TrainerConfig(model=tiny_model_dir, zero_stage=1),
        lm_loss,
        sleep_level=2,
    ) as coord:
        assert coord.last_sync.version == 1
        synced = coord.generate(PROMPTS, GREEDY)
    reference = _reference_generate(tiny_model_dir, PROMPTS)
    assert _tokens(synced) == _tokens(reference)


def test_padded_vocab_survives_buffer_reuse(ray_local, tmp_path):
    """vLLM pads a 1000-token vocabulary to 1024 and defers those layers to the session's end,
    holding views of the receive buffer; later buckets reuse that buffer."""
    from colocate import TinyModelSpec, build_tiny_model

    model = str(build_tiny_model(TinyModelSpec(vocab_size=1000), cache_root=tmp_path))
    spec = TopologySpec(nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1)
    with Coordinator(
        spec,
        EngineConfig(model=model, load_format=LoadFormat.DUMMY),
        TrainerConfig(model=model, zero_stage=2, lr=5e-3),
        lm_loss,
        sync=SyncConfig(bucket_bytes=64 << 10),
    ) as coord:
        assert len(coord.bucket_plan.buckets) > 4
        coord.train(_batch())
        coord.sync()
        synced = coord.generate(PROMPTS, GREEDY)
        ckpt = coord.export_hf(str(tmp_path / "ckpt"))
    assert _tokens(synced) == _tokens(_reference_generate(ckpt, PROMPTS))


def test_tensor_parallel_engine_loads_its_shards(ray_local, tiny_model_dir, tmp_path):
    """TP 2 (vLLM's multiprocess executor on CPU): both workers receive every bucket over the
    group and load their own shard through vLLM's weight loaders."""
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=1, engine_tp=2)
    with Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir, tensor_parallel_size=2),
        TrainerConfig(model=tiny_model_dir, lr=5e-3),
        lm_loss,
        sync=SyncConfig(bucket_bytes=256 << 10),
    ) as coord:
        coord.train(_batch())
        report = coord.sync()
        # Two TP workers, each fingerprinting every received tensor; applied shards summed.
        assert report.verified_tensors == 2 * len(coord.bucket_plan.metas)
        assert report.applied_checked > 0
        synced = coord.generate(PROMPTS, GREEDY)
        ckpt = coord.export_hf(str(tmp_path / "ckpt"))
    assert _tokens(synced) == _tokens(_reference_generate(ckpt, PROMPTS, tp=2))
