"""Lifecycle faults that need no Ray: the engine's bounded worker calls, typed state errors.

The engine actor is a plain class here: its vLLM engine is replaced by a stand-in whose
``collective_rpc`` has vLLM 0.32's signature and, when told to, raises what vLLM's
multi-process executor raises when the bound expires (``TimeoutError``).
"""

from __future__ import annotations

import math

import pytest

from colocate import (
    ActorFailedError,
    ActorStateError,
    ConfigError,
    EngineConfig,
    EngineRpcTimeoutError,
    EngineTenant,
)
from colocate.actors.engine import EngineActor
from colocate.core.calls import Call, _raise_for
from colocate.core.contract import Seat
from colocate.core.run_config import Timeouts

pytestmark = pytest.mark.fast


class _Workers:
    """Stands in for ``vllm.LLM``: records each ``collective_rpc`` and its timeout."""

    def __init__(self, expire: bool = False):
        self.calls: list[tuple] = []
        self.expire = expire

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((getattr(method, "__name__", method), timeout, args))
        if self.expire:
            raise TimeoutError(f"RPC call to {method} timed out.")  # vLLM's own wording
        if method == "ce_warm_up_wait":
            return [{"seconds": 1.0, "error": None}]
        return [{"worker": 0}]


def _engine(workers: _Workers | None, **config) -> EngineActor:
    engine = EngineActor(Seat("engine", 3, 4, (0,), EngineConfig(model="/nonexistent", **config)))
    engine._llm = workers
    return engine


def test_every_worker_call_carries_the_configured_bound():
    workers = _Workers()
    engine = _engine(workers, rpc_timeout_s=7.5)
    engine.applied_fingerprints()
    engine.run_on_workers(len)
    assert [(m, t) for m, t, _ in workers.calls] == [
        ("ws_applied_fingerprints", 7.5),
        ("len", 7.5),
    ]


def test_warm_up_wait_ends_inside_the_call_bound():
    workers = _Workers()
    engine = _engine(workers, rpc_timeout_s=100.0)
    engine._warming = True
    engine._finish_warm_up()
    ((method, timeout, (wait_s,)),) = workers.calls
    assert method == "ce_warm_up_wait" and timeout == 100.0
    assert 0 < wait_s < timeout  # the workers' own message comes back, not a bare expiry


def test_expired_worker_call_is_typed_and_names_engine_method_and_bound():
    engine = _engine(_Workers(expire=True), rpc_timeout_s=2.0)
    with pytest.raises(
        EngineRpcTimeoutError, match=r"engine3: ws_applied_fingerprints .* 2 s"
    ) as e:
        engine.applied_fingerprints()
    assert (e.value.engine, e.value.method, e.value.timeout_s) == (
        "engine3",
        "ws_applied_fingerprints",
        2.0,
    )
    assert isinstance(e.value.__cause__, TimeoutError)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, True, "10"])
def test_bad_rpc_timeout_is_refused(bad):
    with pytest.raises(ConfigError, match=r"EngineConfig\.rpc_timeout_s="):
        EngineConfig(model="/nonexistent", rpc_timeout_s=bad)


def test_bad_kill_timeout_is_refused():
    with pytest.raises(ConfigError, match=r"Timeouts\.kill_s=0"):
        Timeouts(kill_s=0)


def test_unstarted_engine_raises_a_typed_state_error_with_its_message():
    engine = _engine(None)
    with pytest.raises(ActorStateError, match="^engine3: the engine is not started$"):
        engine.applied_fingerprints()
    with pytest.raises(RuntimeError):  # still a RuntimeError for code that caught that
        engine.run_on_workers(len)


def test_driver_reports_a_state_error_as_the_actor_failing():
    call = Call("engine3", None, EngineTenant.wake_kv, (), ("sync", 4, 0))
    with pytest.raises(ActorFailedError, match="engine3 failed in wake_kv") as e:
        _raise_for(call, ActorStateError("engine3: the engine is not started"))
    assert "ActorStateError: engine3: the engine is not started" in str(e.value)
    assert (e.value.actor, e.value.phase, e.value.step) == ("engine3", "sync", 4)
