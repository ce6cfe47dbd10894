"""CPU sleep frees memory for real (vLLM CPU, Ray actors): the KV cache's pages (and at level 2
the weights') go back to the OS, the engine refuses to serve asleep, and after waking (and, at
level 2, a verified sync) it generates exactly what it generated before. RSS is the engine's
process tree (its TP worker processes included), measured by the engine itself.

The tiny model's weights (about 1 MB) are lost in the noise of a 512 MiB KV cache, so the
weights' own release is checked on a model whose weights are a measurable share: the
weight-sync benchmark's 216 MB Llama beside a 64 MiB KV cache, level 1 against level 2."""

import math
from pathlib import Path

import pytest
import ray

from colocate import (
    Coordinator,
    EngineActor,
    EngineConfig,
    PhaseError,
    Sampling,
    TrainerConfig,
    build_tiny_model,
    lm_loss,
)
from colocate.actors.cpu.cpu_sleep import CpuSleepExtension
from colocate.core.contract import Seat
from colocate.core.phases import EngineMemory
from colocate.testing.tiny_model import WEIGHTS_216MB
from placement import TopologySpec

pytestmark = pytest.mark.timeout(900)

KV = 512 << 20  # large enough that the effect is unmistakable
GREEDY = Sampling(n=1, max_tokens=12, temperature=0.0)
PROMPTS = ["kato rimu sena", "lo pe vi da", "mu se na", "ri ka to"]
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
WEIGHT_SPEC = WEIGHTS_216MB  # the weight-sync benchmark's model: ~216 MB in bf16
WEIGHT_KV = 64 << 20  # small beside the weights, so their share of a level-2 drop is large


@pytest.fixture(scope="module")
def weight_model_dir():
    return str(build_tiny_model(WEIGHT_SPEC))


def _engine(model_dir, tp=1, kv=KV):
    config = EngineConfig(model=model_dir, kv_cache_bytes=kv, tensor_parallel_size=tp)
    actor = ray.remote(EngineActor).options(num_gpus=0.5, num_cpus=0.1)
    return actor.remote(Seat("engine", 0, 1, tuple(range(tp)), config, ENV))


def _rss(engine) -> int:
    return ray.get(engine.status.remote(), timeout=60)["rss_tree_bytes"]


def _outputs(engine):
    done = ray.get(engine.generate.remote(PROMPTS, GREEDY), timeout=120)
    return [(c.token_ids, c.logprobs) for c in done]


def _checkpoint_bf16_bytes(model_dir) -> int:
    """The model's weights in the engine's dtype (bf16), from the checkpoint's tensor shapes."""
    from safetensors import safe_open

    numel = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            numel += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return 2 * numel


@pytest.mark.parametrize("tp", [1, 2])
def test_level_1_frees_the_kv_cache_and_serves_the_same_after_waking(ray_local, tiny_model_dir, tp):
    engine = _engine(tiny_model_dir, tp)
    try:
        ray.get(engine.start.remote(), timeout=300)
        before = _outputs(engine)
        awake = _rss(engine)
        assert ray.get(engine.sleep.remote(1), timeout=120) is EngineMemory.ASLEEP
        released = ray.get(engine.status.remote(), timeout=60)["released"]
        asleep = _rss(engine)
        # Every worker released its whole KV cache: tp x 512 MiB, computed from the tensors.
        assert released["kv_bytes"] >= tp * KV * 0.99 and released["weight_bytes"] == 0
        assert awake - asleep >= 0.9 * released["total_bytes"], (awake, asleep, released)
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(engine.generate.remote(PROMPTS, GREEDY), timeout=60)
        assert isinstance(err.value.cause, PhaseError)  # refused; never reads zeroed pages
        ray.get(engine.wake_kv.remote(), timeout=120)
        woken = _rss(engine)
        assert woken - asleep >= 0.9 * released["kv_bytes"]  # the KV cache is resident again
        assert _outputs(engine) == before
    finally:
        ray.get(engine.shutdown.remote(), timeout=60)
        ray.kill(engine)


def test_level_2_releases_the_weight_pages_beyond_what_level_1_releases(
    ray_local, weight_model_dir
):
    weights = _checkpoint_bf16_bytes(weight_model_dir)
    assert weights >= 200e6  # the weights are a measurable share: 216 MB against 64 MiB of KV
    engine = _engine(weight_model_dir, kv=WEIGHT_KV)
    drops, released, workers = {}, {}, {}
    try:
        ray.get(engine.start.remote(), timeout=300)
        ray.get(engine.generate.remote(PROMPTS[:1], GREEDY), timeout=300)
        for level in (1, 2):  # level 2 last: its weights stay released (nothing syncs them)
            awake = _rss(engine)
            assert ray.get(engine.sleep.remote(level), timeout=120) is EngineMemory.ASLEEP
            drops[level] = awake - _rss(engine)
            released[level] = ray.get(engine.status.remote(), timeout=60)["released"]
            last = CpuSleepExtension.cs_last_release
            (workers[level],) = ray.get(engine.run_on_workers.remote(last), timeout=60)
            if level == 1:
                ray.get(engine.wake_kv.remote(), timeout=120)
    finally:
        ray.get(engine.shutdown.remote(), timeout=60)
        ray.kill(engine)
    print(f"\nweights {weights}, drops {drops}, workers {workers}")
    # Level 1 releases the KV cache only, and its pages leave the process.
    assert released[1]["weight_bytes"] == released[1]["packed_bytes"] == 0
    assert released[1]["kv_bytes"] >= 0.99 * WEIGHT_KV
    assert drops[1] >= 0.9 * released[1]["kv_bytes"], (drops, released)
    # Level 2 releases the same KV cache again; what it frees beyond level 1, less what the
    # heap trim returned on its own (free heap pages that were no weights), is the weights'.
    assert released[2]["kv_bytes"] == released[1]["kv_bytes"]
    trim_alone = workers[2]["trim_alone_bytes"]
    weight_drop = drops[2] - drops[1] - trim_alone
    assert weight_drop >= 0.9 * weights, (weight_drop, weights, drops, trim_alone)
    # The engine's own accounting of the weights agrees: parameter pages counted from their
    # storages, packed linear weights measured as the RSS their drop returned.
    assert released[2]["weight_bytes"] + released[2]["packed_bytes"] >= 0.9 * weights
    assert workers[2]["packed_bytes"] >= 0.9 * workers[2]["packed_bytes_estimate"] > 0


def test_level_2_sleep_then_a_verified_sync_serve_the_same_outputs(ray_local, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1)
    with Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir, kv_cache_bytes=KV),
        TrainerConfig(model=tiny_model_dir, zero_stage=1),
        lm_loss,
        sleep_level=2,
    ) as coord:
        before = coord.generate(PROMPTS, GREEDY)
        report = coord.sync()  # ROLLOUT -> TRAIN (level-2 sleep) -> SYNC -> ROLLOUT
        assert report.verified_tensors == len(coord.bucket_plan.metas)
        after = coord.generate(PROMPTS, GREEDY)
        sleeps = [
            s for s in coord.timeline.spans if s.name == "engine.sleep" and s.phase == "train"
        ]
    assert [c.token_ids for c in after] == [c.token_ids for c in before]
    for a, b in zip(after, before, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    (sleep,) = sleeps
    released = sleep.detail["released"]
    assert released["kv_bytes"] >= KV * 0.99
    # The weights were released (their pages read as zeros until rewritten), so the same
    # outputs after the sync are the sync's doing; their RSS is checked on the larger model.
    assert released["weight_bytes"] > 0
    freed = sleep.memory_before.used_bytes - sleep.memory_after.used_bytes
    assert sleep.memory_after.kind == "rss"
    assert freed >= 0.9 * released["total_bytes"], (freed, released)
