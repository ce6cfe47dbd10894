"""A killed actor counts as dead only once Ray reports it DEAD *and* its process is gone.

Ray marks an actor DEAD as it sends the kill: a call on it fails a few milliseconds after
``ray.kill`` while its process still runs. Anything spawned on the same bundle in that gap
starts beside a process that may still hold the GPU's memory, so the fleet confirms each kill
(bounded) before it replaces the actor, and refuses to spawn beside an unconfirmed one.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import ray
from fakes import fake_coordinator, fake_model_dir

from colocate import ActorNotDeadError, ActorStateError
from colocate.core import fleet as fleet_module
from colocate.core.fleet import await_deaths
from colocate.core.handovers import ActorId
from placement import TenantKind

pytestmark = pytest.mark.timeout(120)


@ray.remote(num_cpus=0.01)
class _Sleeper:
    def pid(self) -> int:
        return os.getpid()

    def block(self) -> None:
        time.sleep(600)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.fast
def test_kill_is_confirmed_only_once_the_process_is_gone(ray_local):
    actor = _Sleeper.remote()
    pid = ray.get(actor.pid.remote(), timeout=60)
    actor.block.remote()  # busy: the kill must not wait for it to finish
    start = time.monotonic()
    ray.kill(actor, no_restart=True)
    assert await_deaths({"sleeper": actor}, timeout_s=10.0) == {}
    assert time.monotonic() - start < 10.0
    assert _gone(pid)


@pytest.mark.fast
def test_a_live_actor_is_not_confirmed_dead_within_the_bound(ray_local):
    actor = _Sleeper.remote()
    ray.get(actor.pid.remote(), timeout=60)
    start = time.monotonic()
    assert await_deaths({"sleeper": actor}, timeout_s=0.5) == {"sleeper": "Ray reports it ALIVE"}
    assert 0.5 <= time.monotonic() - start < 5.0
    ray.kill(actor, no_restart=True)


@pytest.mark.fast
def test_unconfirmed_kill_raises_and_nothing_is_spawned_beside_it(ray_local, tmp_path, monkeypatch):
    """A kill Ray never carries out (the ray.kill is dropped): named, bounded, no replacement."""
    with fake_coordinator(fake_model_dir(tmp_path / "m")) as coord:
        fleet = coord.fleet
        engine1 = ActorId(TenantKind.ENGINE, 1)
        pid = coord.actor_status()["engine1"]["pid"]
        fleet.kill_timeout_s = 1.0
        monkeypatch.setattr(fleet_module, "_kill", lambda handle: None)
        start = time.monotonic()
        with pytest.raises(ActorNotDeadError, match=r"\['engine1'\] not confirmed dead") as e:
            fleet.kill(engine1, phase="failed", step=7)
        assert 1.0 <= time.monotonic() - start < 10.0
        assert (e.value.actor, e.value.phase, e.value.step) == ("engine1", "failed", 7)
        assert "Ray reports it ALIVE" in str(e.value)
        assert fleet.handle(engine1) is not None  # kept: a later kill retries
        with pytest.raises(ActorStateError, match="engine1 still exists"):
            fleet.spawn(engine1)

        monkeypatch.undo()  # the kill takes effect again
        fleet.kill(engine1, phase="failed", step=7)
        assert fleet.handle(engine1) is None
        assert _gone(pid)


def test_kill_on_another_node_is_confirmed_there(ray_cluster):
    """The actor's process lives on another node (simulated): a task pinned to that node
    says whether it exited."""
    actor = _Sleeper.options(num_gpus=0.01).remote()  # the head has no GPUs: another node
    pid = ray.get(actor.pid.remote(), timeout=60)
    record = ray._private.state.actors(actor._actor_id.hex())
    assert record["Address"]["NodeID"] != ray.get_runtime_context().get_node_id()
    actor.block.remote()
    ray.kill(actor, no_restart=True)
    assert await_deaths({"sleeper": actor}, timeout_s=30.0) == {}
    assert _gone(pid)  # the simulated nodes share this machine: the pid can be checked here
