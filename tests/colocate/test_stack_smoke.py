"""Smoke tests of the real stack together: Ray with logical GPUs, vLLM CPU, DeepSpeed, gloo."""

import time

import pytest
import ray
import torch

from colocate import (
    EngineConfig,
    EngineRpcTimeoutError,
    LoadFormat,
    Sampling,
    TrainerConfig,
    lm_loss,
)
from colocate.actors.engine import EngineActor
from colocate.actors.trainer import TrainerActor
from colocate.core.contract import Seat

pytestmark = pytest.mark.timeout(600)

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _engine(model_dir, **kw):
    actor = ray.remote(EngineActor).options(num_gpus=0.5, num_cpus=0.1)
    return actor.remote(Seat("engine", 0, 1, (0,), EngineConfig(model=model_dir, **kw), ENV))


def test_vllm_engine_in_ray_actor_generates_deterministically(ray_local, tiny_model_dir):
    engine = _engine(tiny_model_dir)
    try:
        caps = ray.get(engine.start.remote(), timeout=300)
        assert caps.device_type == "cpu" and caps.sleep_supported is False
        greedy = Sampling(n=1, max_tokens=12, temperature=0.0)
        prompts = ["kato rimu sena", "lo pe vi"]
        first = ray.get(engine.generate.remote(prompts, greedy), timeout=120)
        second = ray.get(engine.generate.remote(prompts, greedy), timeout=120)
        assert [c.token_ids for c in first] == [c.token_ids for c in second]
        assert all(len(c.token_ids) == 12 for c in first)
        assert first[0].token_ids != first[1].token_ids  # different prompts, different outputs
        assert all(len(c.logprobs) == 12 and max(c.logprobs) <= 0 for c in first)
        assert {c.weight_version for c in first} == {0}
    finally:
        ray.kill(engine)


def test_dummy_engine_refuses_to_serve_before_a_sync(ray_local, tiny_model_dir):
    engine = _engine(tiny_model_dir, load_format=LoadFormat.DUMMY)
    try:
        ray.get(engine.start.remote(), timeout=300)
        with pytest.raises(ray.exceptions.RayTaskError, match="dummy weights and not synced"):
            ray.get(engine.generate.remote(["kato"], Sampling(max_tokens=4)), timeout=60)
    finally:
        ray.kill(engine)


def test_tensor_parallel_worker_call_is_bounded(ray_local, tiny_model_dir):
    """TP 2 (vLLM's multi-process executor): a worker call that outlives
    ``EngineConfig.rpc_timeout_s`` comes back as a typed error at the bound, not when (or if)
    the workers finish."""
    env = {**ENV, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}  # as the fleet sets it for TP on CPU
    actor = ray.remote(EngineActor).options(num_gpus=1, num_cpus=0.1)
    config = EngineConfig(model=tiny_model_dir, tensor_parallel_size=2, rpc_timeout_s=5.0)
    engine = actor.remote(Seat("engine", 0, 1, (0, 1), config, env))
    try:
        ray.get(engine.start.remote(), timeout=300)
        start = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError) as e:
            ray.get(engine.run_on_workers.remote(lambda worker: time.sleep(60)), timeout=55)
        assert 5.0 <= time.monotonic() - start < 55
        cause = e.value.cause
        assert isinstance(cause, EngineRpcTimeoutError), repr(cause)
        assert (cause.engine, cause.timeout_s) == ("engine0", 5.0)
        assert "did not finish within 5 s" in str(cause)
    finally:
        ray.kill(engine)


def _fixed_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (4, 24), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": torch.ones(ids.shape, dtype=torch.float32),
    }


def _trainers(model_dir, world=2, **kw):
    cls = ray.remote(TrainerActor)
    env = {"DS_ACCELERATOR": "cpu"}
    config = TrainerConfig(model=model_dir, lr=1e-3, **kw)
    actors = [
        cls.options(num_gpus=0.5, num_cpus=0.1).remote(
            Seat("trainer", r, world, (r,), config, env, lm_loss)
        )
        for r in range(world)
    ]
    master = ray.get(actors[0].host_group_store.remote(False, 60), timeout=60)
    info = ray.get([a.start.remote(master, 60) for a in actors], timeout=400)
    return actors, info


def test_deepspeed_zero3_two_ranks_lowers_loss(ray_local, tiny_model_dir):
    actors, info = _trainers(tiny_model_dir)
    try:
        assert [i["zero_stage"] for i in info] == [3, 3]
        assert info[0]["optimizer"] == "FusedAdam"
        batch = _fixed_batch()
        losses = []
        for _ in range(5):
            metrics = ray.get([a.train_step.remote(batch) for a in actors], timeout=120)
            losses.append(sum(m["loss"] for m in metrics) / 2)
        assert losses[-1] < losses[0] - 0.3, losses
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    finally:
        ray.get([a.shutdown.remote() for a in actors], timeout=60)
        for a in actors:
            ray.kill(a)


@ray.remote(num_cpus=0.1, num_gpus=0.5)
class _GlooReceiver:
    def receive(self, rdv, plan):
        from weight_sync.collective import CollectiveReceiver

        receiver = CollectiveReceiver(rdv, 1, plan.max_bucket_bytes, torch.device("cpu"))
        out = {}
        for bucket in plan.buckets:
            buffer = receiver.receive(bucket).wait()
            out.update({n: t.clone() for n, t in bucket.views(buffer)})
        receiver.close()
        return out


def test_gloo_group_beside_deepspeed_broadcasts_bit_exact(ray_local, tiny_model_dir):
    from weight_sync import LLAMA_PACKING, Backend, Rendezvous, SyncRequest, plan_buckets

    actors, _ = _trainers(tiny_model_dir)
    receiver = _GlooReceiver.remote()
    try:
        metas = ray.get(actors[0].weight_metas.remote(torch.float32), timeout=60)
        plan = plan_buckets(metas, 256 << 10, LLAMA_PACKING)  # small buckets: several in flight
        assert len(plan.buckets) > 2
        port = ray.get(actors[0].host_sync_store.remote("127.0.0.1", 2, "smoke", 30), timeout=60)
        rdv = Rendezvous("127.0.0.1", port, 2, "smoke", 30.0, Backend.GLOO)
        got = receiver.receive.remote(rdv, plan)
        ray.get(
            [actors[0].setup_sync.remote(plan, [rdv]), actors[1].setup_sync.remote(plan, [])],
            timeout=60,
        )
        reports = ray.get(
            [a.send_weights.remote(SyncRequest(1, verify=True)) for a in actors], timeout=120
        )
        received = ray.get(got, timeout=120)
        sent = ray.get([a.param_fingerprints.remote() for a in actors], timeout=120)[0]
        from weight_sync import fingerprint

        assert set(received) == set(sent) == set(reports[0].fingerprints)
        for name, tensor in received.items():
            assert fingerprint(tensor) == sent[name], name
        # DeepSpeed's own group still works after the side group was used.
        metrics = ray.get([a.train_step.remote(_fixed_batch()) for a in actors], timeout=120)
        assert all(m["loss"] > 0 for m in metrics)
    finally:
        ray.kill(receiver)
        ray.get([a.shutdown.remote() for a in actors], timeout=60)
        for a in actors:
            ray.kill(a)
