"""The per-GPU hand-over on real Ray actors: releases before acquisitions per GPU, GPUs in
parallel, typed calls checked on the driver, and a dead actor turned into a typed error."""

import sys
import time

import pytest
import ray

from colocate.core.calls import Call, Chain, wait_all
from colocate.core.contract import Seat, Tenant
from colocate.core.errors import ActorFailedError, ActorTimeoutError

pytestmark = [pytest.mark.fast, pytest.mark.timeout(120)]


class _Tenant(Tenant):
    """A tiny real actor behind the same ``invoke`` entry point the coordinator uses."""

    def __init__(self):
        super().__init__(Seat("tiny", 0, 1, ()))

    def work(self, seconds):
        start = time.time()
        time.sleep(seconds)
        return start, time.time()

    def die(self):
        import os

        os._exit(1)

    def status(self):
        return {}

    def inject_fault(self, fault):
        pass

    def shutdown(self):
        pass


# Ray workers cannot import test modules: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
_Remote = ray.remote(num_cpus=0.05)(_Tenant)


def _handover(releases, acquires, prepares=()):
    chain = Chain()
    chain.add_handover(releases, acquires, prepares)
    return chain.run(30)


def _call(name, handle, seconds, lanes, tag=("train", 1)):
    return Call(name, handle, _Tenant.work, (seconds,), tag, lanes)


def test_releases_precede_acquisitions_per_gpu_and_gpus_run_in_parallel(ray_local):
    a = [_Remote.remote() for _ in range(4)]
    releases = [_call("slow", a[0], 1.5, (0,)), _call("fast", a[1], 0.1, (1,))]
    acquires = [_call("acq0", a[2], 0.1, (0,)), _call("acq1", a[3], 0.1, (1,))]
    ray.get([x.work.remote(0) for x in a], timeout=60)  # actors up before timing
    t0 = time.time()
    _, _, (acq0_start, _), (acq1_start, _) = _handover(releases, acquires)
    # GPU 0's acquisition waited for GPU 0's slow release; GPU 1's did not wait for it.
    assert acq0_start - t0 >= 1.4
    assert acq1_start - t0 < 1.0


def test_a_preparation_waits_for_no_release_on_its_gpu(ray_local):
    """A trainer's preparation runs at once, its acquisition (same actor) after the release."""
    a = [_Remote.remote() for _ in range(2)]
    ray.get([x.work.remote(0) for x in a], timeout=60)
    t0 = time.time()
    (prep_start, prep_end), _, (acq_start, _) = _handover(
        [_call("engine0", a[0], 1.5, (0,))],
        [_call("trainer0", a[1], 0.1, (0,))],
        [_call("trainer0", a[1], 0.1, (0,))],
    )
    assert prep_start - t0 < 1.0  # the preparation did not wait for the release on GPU 0
    assert acq_start - t0 >= 1.4  # the acquisition did
    assert acq_start >= prep_end  # and ran after its own actor's preparation


def test_calls_submitted_early_run_while_the_driver_adds_the_next_row(ray_local):
    """What the start-up does: the engines' row starts, the driver learns an argument of the
    next row meanwhile, adds it to the same chain; one wait; the order per actor and GPU holds."""
    a = [_Remote.remote() for _ in range(2)]
    ray.get([x.work.remote(0) for x in a], timeout=60)
    chain = Chain()
    t0 = time.time()
    first = chain.add(_call("engine0", a[0], 0.5, (0,), ("start", 0)))
    chain.submit()
    time.sleep(0.3)  # the driver's own wait (in the start-up: the trainer group's store)
    steps = chain.add_handover(
        [_call("engine0", a[0], 0.2, (0,), ("init", 0))], [_call("trainer0", a[1], 0, (0,))]
    )
    results = chain.run(30)
    (start0, end0), (sleep0, sleep_end), (acq, _) = (results[first], *(results[s] for s in steps))
    assert start0 - t0 < 0.3  # it ran before the next row was added
    assert sleep0 >= end0 and acq >= sleep_end  # same actor in order; release before acquisition
    assert len(chain.refs) == 3


def test_multi_gpu_acquisition_waits_for_all_its_gpus(ray_local):
    a = [_Remote.remote() for _ in range(3)]
    ray.get([x.work.remote(0) for x in a], timeout=60)
    releases = [_call("r0", a[0], 0.1, (0,)), _call("r1", a[1], 1.0, (1,))]
    t0 = time.time()
    *_, (start, _) = _handover(releases, [_call("tp2", a[2], 0, (0, 1))])
    assert start - t0 >= 0.9


def test_dead_actor_gives_typed_error_in_bounded_time(ray_local):
    victim = _Remote.remote()
    ray.get(victim.work.remote(0), timeout=60)
    t0 = time.time()
    with pytest.raises(ActorFailedError) as err:
        wait_all([Call("engine3", victim, _Tenant.die, (), ("sync", 7))], 30)
    assert time.time() - t0 < 30
    assert err.value.actor == "engine3" and err.value.phase == "sync" and err.value.step == 7
    assert "engine3 died during die (phase 'sync', step 7)" in str(err.value)


def test_slow_actor_gives_timeout_error(ray_local):
    slow = _Remote.remote()
    with pytest.raises(ActorTimeoutError, match="slow.work did not finish within 1 s"):
        wait_all([_call("slow", slow, 10, (), ("rollout", 2))], 1)
    ray.kill(slow)


def test_calls_are_checked_on_the_driver_before_anything_is_sent():
    with pytest.raises(TypeError, match=r"_Tenant.work\(self, seconds.*cannot take 2"):
        Call("t", None, _Tenant.work, (1, 2))
    with pytest.raises(TypeError, match="cannot take 0"):
        Call("t", None, _Tenant.work, ())


def test_invoke_runs_only_contract_verbs(ray_local):
    actor = _Remote.remote()
    with pytest.raises(ray.exceptions.RayTaskError, match="'__init__' is not a verb"):
        ray.get(actor.invoke.remote("__init__", (), ("x", 0)), timeout=60)
    ray.kill(actor)
