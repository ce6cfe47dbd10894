"""CPU sleep frees memory for real (vLLM CPU, Ray actors): the KV cache's pages (and at level 2
the weights') go back to the OS, the engine refuses to serve asleep, and after waking (and, at
level 2, a verified sync) it generates exactly what it generated before. RSS is the engine's
process tree (its TP worker processes included), measured by the engine itself."""

import pytest
import ray

from colocate import (
    Coordinator,
    EngineActor,
    EngineConfig,
    PhaseError,
    Sampling,
    TrainerConfig,
    lm_loss,
)
from colocate.phases import EngineMemory
from placement import TopologySpec

pytestmark = pytest.mark.timeout(900)

KV = 512 << 20  # large enough that the effect is unmistakable
GREEDY = Sampling(n=1, max_tokens=12, temperature=0.0)
PROMPTS = ["kato rimu sena", "lo pe vi da", "mu se na", "ri ka to"]
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def _engine(model_dir, tp=1):
    config = EngineConfig(model=model_dir, kv_cache_bytes=KV, tensor_parallel_size=tp)
    actor = ray.remote(EngineActor).options(num_gpus=0.5, num_cpus=0.1)
    return actor.remote(config, "engine0", tuple(range(tp)), ENV)


def _rss(engine) -> int:
    return ray.get(engine.status.remote(), timeout=60)["rss_tree_bytes"]


def _outputs(engine):
    done = ray.get(engine.generate.remote(PROMPTS, GREEDY), timeout=120)
    return [(c.token_ids, c.logprobs) for c in done]


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


def test_level_2_frees_the_weights_too_and_a_verified_sync_restores_them(ray_local, tiny_model_dir):
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
    assert released["weight_bytes"] + released["packed_bytes"] > 0
    freed = sleep.memory_before.used_bytes - sleep.memory_after.used_bytes
    assert sleep.memory_after.kind == "rss"
    assert freed >= 0.9 * released["total_bytes"], (freed, released)
