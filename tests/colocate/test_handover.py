"""The per-GPU hand-over on real Ray actors: releases before acquisitions per GPU, GPUs in
parallel, and a dead actor turned into a typed error naming it."""

import time

import pytest
import ray

from colocate.calls import Call, handover, wait_all
from colocate.errors import ActorFailedError, ActorTimeoutError

pytestmark = pytest.mark.timeout(120)


@ray.remote(num_cpus=0.05)
class _Tenant:
    def work(self, seconds, *after):
        start = time.time()
        time.sleep(seconds)
        return start, time.time()

    def die(self):
        import os

        os._exit(1)


def test_releases_precede_acquisitions_per_gpu_and_gpus_run_in_parallel(ray_local):
    a = [_Tenant.remote() for _ in range(4)]
    releases = [Call("slow", a[0], "work", (1.5,), (0,)), Call("fast", a[1], "work", (0.1,), (1,))]
    acquires = [Call("acq0", a[2], "work", (0.1,), (0,)), Call("acq1", a[3], "work", (0.1,), (1,))]
    ray.get([x.work.remote(0) for x in a], timeout=60)  # actors up before timing
    t0 = time.time()
    (acq0_start, _), (acq1_start, _) = handover(releases, acquires, ("train", 1), 30)
    # GPU 0's acquisition waited for GPU 0's slow release; GPU 1's did not wait for it.
    assert acq0_start - t0 >= 1.4
    assert acq1_start - t0 < 1.0


def test_multi_gpu_acquisition_waits_for_all_its_gpus(ray_local):
    a = [_Tenant.remote() for _ in range(3)]
    ray.get([x.work.remote(0) for x in a], timeout=60)
    releases = [Call("r0", a[0], "work", (0.1,), (0,)), Call("r1", a[1], "work", (1.0,), (1,))]
    t0 = time.time()
    ((start, _),) = handover(releases, [Call("tp2", a[2], "work", (0,), (0, 1))], ("x", 0), 30)
    assert start - t0 >= 0.9


def test_dead_actor_gives_typed_error_in_bounded_time(ray_local):
    victim = _Tenant.remote()
    ray.get(victim.work.remote(0), timeout=60)
    t0 = time.time()
    with pytest.raises(ActorFailedError) as err:
        wait_all([Call("engine3", victim, "die")], ("sync", 7), 30)
    assert time.time() - t0 < 30
    assert err.value.actor == "engine3" and err.value.phase == "sync" and err.value.step == 7
    assert "engine3 died during die (phase 'sync', step 7)" in str(err.value)


def test_slow_actor_gives_timeout_error(ray_local):
    slow = _Tenant.remote()
    with pytest.raises(ActorTimeoutError, match="slow.work did not finish within 1 s"):
        wait_all([Call("slow", slow, "work", (10,))], ("rollout", 2), 1)
    ray.kill(slow)
