"""The actors of one pipeline: created on their bundles, pinged, replaced, torn down.

The fleet decides nothing about order; the coordinator calls it. It owns the Ray handles, the
per-actor environment (read here, at the edge, and passed explicitly), and the explicit
dispatch verbs (:meth:`Fleet.engine_call`, :meth:`Fleet.trainer_call`).
"""

from __future__ import annotations

from collections.abc import Callable

import ray

from colocate.calls import Call
from colocate.config import EngineConfig, TrainerConfig
from colocate.engine import EngineActor
from colocate.timeline import Span
from colocate.trainer import TrainerActor
from placement import Plan, Reservation

__all__ = ["Fleet"]


class Fleet:
    """Engine and trainer actors of one topology.

    Args:
        name: Prefix of the Ray actor names.
        plan: The placement plan.
        reservation: The reserved bundles.
        engine_config: Shared by every engine.
        trainer_config: Shared by every trainer rank.
        trainer_cls: The trainer actor class (a :class:`TrainerActor` subclass).
        loss_fn: The user's loss, shipped to every trainer rank.
        device_type: ``"cuda"`` or ``"cpu"``.
    """

    def __init__(
        self,
        name: str,
        plan: Plan,
        reservation: Reservation,
        engine_config: EngineConfig,
        trainer_config: TrainerConfig,
        trainer_cls: type[TrainerActor],
        loss_fn: Callable,
        device_type: str,
    ):
        self.name = name
        self.plan = plan
        self.reservation = reservation
        self.engine_config = engine_config
        self.trainer_config = trainer_config
        self.trainer_cls = trainer_cls
        self.loss_fn = loss_fn
        self.device_type = device_type
        self.engines: list = [None] * plan.spec.engines
        self.trainers: list = [None] * plan.spec.trainer_world_size
        self._drains: dict = {}  # drain request -> actor, while unanswered

    # ----- dispatch ---------------------------------------------------------------------------

    def engine_lanes(self, e: int) -> tuple[int, ...]:
        """GPUs (bundle indices) of engine ``e``."""
        return self.plan.engine_bundles(e)

    def engine_call(self, e: int, method: str, *args) -> Call:
        """A call of ``method`` on engine ``e``."""
        return Call(f"engine{e}", self.engines[e], method, args, self.engine_lanes(e))

    def trainer_call(self, r: int, method: str, *args) -> Call:
        """A call of ``method`` on trainer rank ``r``."""
        return Call(f"trainer{r}", self.trainers[r], method, args, (self.plan.trainer_bundle(r),))

    # ----- creation ---------------------------------------------------------------------------

    def _engine_env(self) -> dict[str, str]:
        # In-process engine core: collective_rpc then reaches the worker in the actor's process.
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_LOGGING_LEVEL": self.engine_config.log_level,
        }
        if self.device_type == "cpu" and self.plan.spec.engine_tp > 1:
            # The CPU backend's NUMA auto-binding refuses several workers on one NUMA node.
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        return env

    def spawn_engine(self, e: int) -> None:
        """Creates engine ``e``'s actor on its bundle (the engine is built by its ``start``)."""
        launch = self.reservation.engine_launch(e, cuda=self.device_type == "cuda")
        env = {**self._engine_env(), **launch.executor_env}
        self.engines[e] = (
            ray.remote(EngineActor)
            .options(**launch.actor_options, name=f"{self.name}-engine{e}-{_fresh()}")
            .remote(self.engine_config, f"engine{e}", self.engine_lanes(e), env)
        )

    def spawn_trainer(self, r: int) -> None:
        """Creates trainer rank ``r``'s actor on its bundle (the model is built by ``start``)."""
        if self.device_type == "cpu":
            env = {"DS_ACCELERATOR": "cpu"}
        else:
            # Expandable segments let empty_cache() return partly used segments: after ZeRO-3
            # offload_states torch's allocator keeps 1% of its training peak instead of 14%
            # (measured on an H200, docs/gpu-results.md). Trainer processes only: vLLM's sleep
            # mode allocator refuses this setting.
            env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        self.trainers[r] = (
            ray.remote(self.trainer_cls)
            .options(
                **self.reservation.trainer_options(r), name=f"{self.name}-trainer{r}-{_fresh()}"
            )
            .remote(
                self.trainer_config,
                r,
                self.plan.spec.trainer_world_size,
                f"trainer{r}",
                self.plan.trainer_bundle(r),
                self.loss_fn,
                env,
            )
        )

    # ----- health -----------------------------------------------------------------------------

    def dead(self, timeout_s: float = 10.0) -> tuple[list[int], list[int]]:
        """Pings every actor; returns the engines and trainer ranks that did not answer."""
        handles = [("e", i, h) for i, h in enumerate(self.engines)]
        handles += [("t", i, h) for i, h in enumerate(self.trainers)]
        refs = {h.status.remote(): (kind, i) for kind, i, h in handles if h is not None}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        alive = set()
        for ref in ready:
            try:
                ray.get(ref)
                alive.add(refs[ref])
            except Exception:  # noqa: BLE001 - a dead actor raises here; it is what we look for
                continue
        dead_engines = [i for i, h in enumerate(self.engines) if ("e", i) not in alive]
        dead_trainers = [i for i, h in enumerate(self.trainers) if ("t", i) not in alive]
        return dead_engines, dead_trainers

    def statuses(self, timeout_s: float = 30.0) -> dict[str, dict]:
        """Every live actor's status (memory state, pid, RSS, open fds, threads)."""
        named = [(f"engine{i}", h) for i, h in enumerate(self.engines)]
        named += [(f"trainer{i}", h) for i, h in enumerate(self.trainers)]
        out = {}
        for name, h in named:
            try:
                out[name] = ray.get(h.status.remote(), timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a dead actor has no status
                continue
        return out

    def drain_spans(self, timeout_s: float = 30.0) -> list[Span]:
        """Collects the spans every live actor recorded since the last call (all at once).

        An actor still busy (e.g. blocked in a failed transfer until its timeout) answers
        later: its request stays pending and its spans come with a later call.
        """
        for h in self.engines + self.trainers:
            if h is not None and h not in self._drains.values():
                self._drains[h.drain_spans.remote()] = h
        ready, _ = ray.wait(list(self._drains), num_returns=len(self._drains), timeout=timeout_s)
        spans = []
        for ref in ready:
            self._drains.pop(ref)
            try:
                spans.extend(ray.get(ref))
            except Exception:  # noqa: BLE001 - a dead actor has no spans to give
                continue
        return spans

    # ----- teardown ---------------------------------------------------------------------------

    def kill_engine(self, e: int) -> None:
        """Ends engine ``e``'s actor (dead or alive) without a restart."""
        _kill(self.engines[e])
        self.engines[e] = None

    def kill_trainer(self, r: int) -> None:
        """Ends trainer rank ``r``'s actor (dead or alive) without a restart."""
        _kill(self.trainers[r])
        self.trainers[r] = None

    def shutdown(self) -> None:
        """Asks every actor to close its groups, then kills it. Never raises."""
        for h in self.engines + self.trainers:
            if h is None:
                continue
            try:
                ray.get(h.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort before the kill
                pass
            _kill(h)
        self.engines = [None] * len(self.engines)
        self.trainers = [None] * len(self.trainers)


def _kill(handle) -> None:
    if handle is not None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _fresh() -> str:
    import uuid

    return uuid.uuid4().hex[:6]
