"""Soak: many rollout -> train -> sync cycles; memory, descriptors and threads stay flat, every
sync verifies, and shutdown returns Ray to its baseline. 20 cycles in CI, 200 marked slow.

The engines' sleep frees memory on CPU too (``colocate.actors.cpu.cpu_sleep``): after every ROLLOUT
-> TRAIN hand-over each engine's process RSS must be down by its KV cache, and asleep it must come
back to the same level every cycle."""

import os
import threading

import psutil
import pytest
import ray
from ray.util.placement_group import placement_group_table

from colocate import Coordinator, EngineConfig, Sampling, TrainerConfig, grpo_loss, make_grpo_batch
from placement import TopologySpec

WARMUP = 5
RSS_DRIFT = 0.05
KV = 256 << 20  # per engine: asleep vs awake is unmistakable
# Ray's core worker and gRPC start native threads on demand, up to fixed pool sizes; seen:
# +2 in the driver over 200 cycles, never more. Python-level threads must not grow at all.
NATIVE_THREAD_SLACK = 2
SAMPLING = Sampling(n=4, max_tokens=8)
PROMPTS = ["kato rimu", "sena lo", "pe vi da", "mu se"]


def _alive_actors():
    # Every actor of a pipeline is named; the listing holds the live ones.
    return len(ray.util.list_named_actors(all_namespaces=True))


def _reserved_groups():
    return len([g for g in placement_group_table().values() if g["state"] != "REMOVED"])


def _engine_rss(coord) -> dict[str, int]:
    """Each engine's process-tree RSS, as the engine reports it."""
    return {
        name: s["rss_tree_bytes"]
        for name, s in coord.actor_status().items()
        if name.startswith("engine")
    }


def _soak(cycles, model_dir, report):
    driver = psutil.Process(os.getpid())
    actors_before, groups_before = _alive_actors(), _reserved_groups()
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    samples, asleep = [], []
    with Coordinator(
        spec,
        EngineConfig(model=model_dir, kv_cache_bytes=KV),
        TrainerConfig(model=model_dir, lr=1e-3),
        grpo_loss,
    ) as coord:
        tensors = len(coord.bucket_plan.metas)
        for cycle in range(cycles):
            completions = coord.generate(PROMPTS, SAMPLING)
            rewards = [float(sum(t % 3 == 0 for t in c.token_ids)) for c in completions]
            awake = _engine_rss(coord)
            coord.train(make_grpo_batch(completions, rewards, SAMPLING.n, pad_id=2))
            slept = _engine_rss(coord)  # after the ROLLOUT -> TRAIN hand-over
            for name, rss in slept.items():
                assert awake[name] - rss >= 0.9 * KV, f"{name} still resident asleep ({cycle})"
            asleep.append(slept)
            sync = coord.sync()
            assert sync.verified_tensors == 2 * tensors, cycle  # fingerprints matched
            status = coord.actor_status()
            status["driver"] = {
                "rss_bytes": driver.memory_info().rss,
                "open_fds": driver.num_fds(),
                "threads": driver.num_threads(),
                "python_threads": threading.active_count(),
            }
            samples.append(status)
    worst, threads = {}, {}
    for name in samples[0]:
        base = samples[WARMUP][name]
        later = [s[name] for s in samples[WARMUP:]]
        drift = max(abs(s["rss_bytes"] - base["rss_bytes"]) for s in later) / base["rss_bytes"]
        worst[name] = drift
        assert drift <= RSS_DRIFT, f"{name}: RSS drifted {drift:.1%} after warm-up"
        assert later[-1]["open_fds"] <= base["open_fds"], f"{name}: file descriptors grew"
        growth = later[-1]["threads"] - base["threads"]
        assert growth <= NATIVE_THREAD_SLACK, f"{name}: {growth} more threads"
        threads[name] = growth
        if "python_threads" in base:
            assert later[-1]["python_threads"] <= base["python_threads"], "driver threads grew"
    asleep_drift = {}
    for name in asleep[0]:
        base = asleep[WARMUP][name]
        drift = max(abs(a[name] - base) for a in asleep[WARMUP:]) / base
        asleep_drift[name] = drift
        assert drift <= RSS_DRIFT, f"{name}: RSS asleep drifted {drift:.1%} after warm-up"
    assert _alive_actors() == actors_before
    assert _reserved_groups() == groups_before
    report.setdefault("soak", []).append(
        {
            "cycles": cycles,
            "largest_rss_drift": max(worst.values()),
            "rss_drift_by_actor": worst,
            "largest_asleep_rss_drift": max(asleep_drift.values()),
            "asleep_rss_drift_by_engine": asleep_drift,
        }
    )


@pytest.mark.timeout(900)
def test_soak_20_cycles(ray_local, tiny_model_dir, report):
    _soak(20, tiny_model_dir, report)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_200_cycles(ray_local, tiny_model_dir, report):
    _soak(200, tiny_model_dir, report)
