"""The actors of one pipeline: created on their bundles, pinged, replaced, torn down.

The fleet decides nothing about order; the coordinator calls it. It owns the Ray handles, the
per-actor environment (stated here, explicitly, for both device kinds, from the reservation's
device facts), and the typed calls (:meth:`Fleet.call`).

A kill is complete only once it is confirmed (:func:`await_deaths`): Ray reports the actor
DEAD *and* its process is gone. Ray marks an actor DEAD as it sends the kill, before the
process exits (a call on it can fail while the process still runs: ``docs/design.md``, section
8a); a replacement spawned in between could start beside a process still holding the
bundle's GPU memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from colocate.core.calls import Call
from colocate.core.contract import Seat, Tag
from colocate.core.errors import ActorNotDeadError, ActorStateError
from colocate.core.handovers import ActorId, actors_of, lanes_of
from colocate.core.run_config import RunConfig
from colocate.core.tenants import group_name, tenant_groups
from colocate.operations.timeline import Span
from placement import DeviceKind, Plan, Reservation, TenantKind

__all__ = ["Fleet", "await_deaths"]

_POLL_S = 0.02  # how often a kill's confirmation is re-read


class Fleet:
    """Engine, trainer and role actors of one topology.

    Args:
        config: The run's configuration (actor classes and configs, the loss shipped to every
            trainer rank, the roles, the name prefix, ``Timeouts.kill_s`` for :meth:`kill`).
        plan: The placement plan.
        reservation: The reserved bundles.
    """

    def __init__(self, config: RunConfig, plan: Plan, reservation: Reservation):
        self.name = config.name
        self.plan = plan
        self.reservation = reservation
        self.device: DeviceKind = reservation.device
        self.engine_config = config.engine
        self.groups = {g.name: g for g in tenant_groups(config, plan)}
        self.kill_timeout_s = config.timeouts.kill_s
        # Every planned actor, by id; None while it does not exist (before spawn, after a kill).
        self._handles: dict[ActorId, object] = {
            a: None for kind in TenantKind for a in actors_of(plan, kind)
        }
        self._drains: dict = {}  # drain request -> actor, while unanswered
        self._lanes = {a: lanes_of(plan, a) for a in self._handles}

    # ----- dispatch ---------------------------------------------------------------------------

    @property
    def actors(self) -> list[ActorId]:
        """Every planned actor (alive or not), by kind."""
        return list(self._handles)

    def handle(self, actor: ActorId):
        """The Ray handle of ``actor`` (None while it does not exist)."""
        return self._handles[actor]

    def call(self, actor: ActorId, verb: Callable, *args, tag: Tag) -> Call:
        """A call of contract method ``verb`` on ``actor`` (arguments checked now)."""
        return Call(actor.name, self.handle(actor), verb, args, tag, self._lanes[actor])

    def engine_call(self, e: int, verb: Callable, *args, tag: Tag) -> Call:
        """A call of ``verb`` (an :class:`EngineTenant` method) on engine ``e``."""
        return self.call(ActorId(TenantKind.ENGINE, e), verb, *args, tag=tag)

    def by_name(self, name: str) -> ActorId:
        """The planned actor called ``name`` (``"engine0"``, ``"reference1"``)."""
        found = {a.name: a for a in self._handles}
        if name not in found:
            raise ValueError(f"no actor {name!r}; fix: use one of {sorted(found)}")
        return found[name]

    def trainer_call(self, r: int, verb: Callable, *args, tag: Tag) -> Call:
        """A call of ``verb`` (a :class:`TrainerTenant` method) on trainer rank ``r``."""
        return self.call(ActorId(TenantKind.TRAINER, r), verb, *args, tag=tag)

    # ----- creation ---------------------------------------------------------------------------

    def engine_env(self) -> dict[str, str]:
        """The environment every engine actor sets before vLLM is imported (both devices)."""
        # In-process engine core: collective_rpc then reaches the worker in the actor's process.
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_LOGGING_LEVEL": self.engine_config.log_level,
        }
        if self.device is DeviceKind.CPU and self.plan.spec.engine_tp > 1:
            # The CPU backend's NUMA auto-binding refuses several workers on one NUMA node.
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        if self.device is DeviceKind.CPU and self.engine_config.enforce_eager is not False:
            # An eager CPU engine compiles one thing: vLLM's torch.compile'd logprob gather, on
            # the first generate that asks for log-probs (seconds, against a fraction of one for
            # a later generate: docs/design.md, section 8a). Eager, it costs nothing measurable.
            env["TORCHDYNAMO_DISABLE"] = "1"
        return env

    def trainer_env(self) -> dict[str, str]:
        """The environment every trainer actor sets before DeepSpeed is imported."""
        if self.device is DeviceKind.CPU:
            return {"DS_ACCELERATOR": "cpu"}
        # Expandable segments let empty_cache() return partly used segments: after ZeRO-3
        # offload_states torch's allocator keeps 1% of its training peak instead of 14%
        # (measured on an H200, docs/gpu-results.md). Trainer processes only: vLLM's sleep
        # mode allocator refuses this setting.
        return {"DS_ACCELERATOR": "cuda", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}

    def role_env(self) -> dict[str, str]:
        """The environment every role actor sets first: the trainers' (the critic trains)."""
        return self.trainer_env()

    def _placement(self, actor: ActorId) -> tuple[dict, dict[str, str]]:
        """Ray options placing ``actor`` on its bundles, and the environment it sets first."""
        kind, res = actor.kind, self.reservation
        if kind is TenantKind.ENGINE:
            launch = res.engine_launch(actor.index)
            return launch.actor_options, {**self.engine_env(), **launch.executor_env}
        if kind is TenantKind.ROLE:
            return res.role_options(actor.role, actor.index), self.role_env()
        return res.trainer_options(actor.index), self.trainer_env()

    def spawn(self, actor: ActorId) -> None:
        """Creates ``actor`` on its bundles as ``actor_cls(seat)``, replacing none.

        One code path for every tenant group: its class, config and (for the policy's
        trainer) loss come from the group; its options and environment from where it sits.

        Raises:
            ActorStateError: ``actor`` still has a handle: it was never killed, or its kill was
                not confirmed (:meth:`kill`); nothing is created beside it.
        """
        if self._handles[actor] is not None:
            raise ActorStateError(
                f"{actor.name} still exists (not killed, or its death not confirmed); "
                "kill it before spawning its replacement"
            )
        group = self.groups[group_name(actor)]
        options, env = self._placement(actor)
        seat = Seat(
            group.name,
            actor.index,
            len(group.ranks),
            self._lanes[actor],
            group.config,
            env,
            group.loss_fn,
        )
        self._handles[actor] = (
            ray.remote(group.actor_cls)
            .options(**options, name=f"{self.name}-{actor.name}-{_fresh()}")
            .remote(seat)
        )

    # ----- health -----------------------------------------------------------------------------

    def dead(self, timeout_s: float = 10.0) -> list[ActorId]:
        """Pings every actor at once; returns those that did not answer within ``timeout_s``."""
        refs = {h.status.remote(): a for a, h in self._handles.items() if h is not None}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        alive = set()
        for ref in ready:
            try:
                ray.get(ref)
                alive.add(refs[ref])
            except Exception:  # noqa: BLE001 - a dead actor raises here; it is what we look for
                continue
        return [a for a in self._handles if a not in alive]

    def statuses(self, timeout_s: float = 30.0) -> dict[str, dict]:
        """Every live actor's status (memory state, pid, RSS, open fds, threads), by name."""
        refs = {a: h.status.remote() for a, h in self._handles.items() if h is not None}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        out = {}
        for a, ref in refs.items():
            try:
                out[a.name] = ray.get(ref, timeout=0.1)
            except Exception:  # noqa: BLE001 - a dead actor has no status
                continue
        return out

    def drain_spans(self, timeout_s: float = 30.0) -> list[Span]:
        """Collects the spans every live actor recorded since the last call (all at once).

        An actor still busy (e.g. blocked in a failed transfer until its timeout) answers
        later: its request stays pending and its spans come with a later call.
        """
        for h in self._handles.values():
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

    def kill(self, *actors: ActorId, phase: str, step: int) -> None:
        """Ends ``actors`` (dead or alive, no restart); returns once each is confirmed dead.

        Every kill is sent first, then all are confirmed against one deadline
        (``kill_timeout_s``): Ray reports the actor DEAD and its process is gone, so whatever
        is spawned next on its bundle never starts beside it.

        Args:
            actors: The actors to end (one not alive is skipped).
            phase: The phase, for the error.
            step: The RL step, for the error.

        Raises:
            ActorNotDeadError: Some actor was not confirmed dead in time; the message names
                each with what was last seen of it. Its handle is kept (a later kill retries).
        """
        handles = {a: self._handles[a] for a in actors if self._handles[a] is not None}
        for h in handles.values():
            _kill(h)
        late = await_deaths({a.name: h for a, h in handles.items()}, self.kill_timeout_s)
        for a in handles:
            if a.name not in late:
                self._handles[a] = None
        if late:
            seen = "; ".join(f"{name}: {what}" for name, what in late.items())
            raise ActorNotDeadError(
                f"{sorted(late)} not confirmed dead within {self.kill_timeout_s:g} s of "
                f"ray.kill ({seen}); nothing was started in their place; fix: check the "
                "node for a hung process, or raise Timeouts.kill_s",
                actor=next(iter(late)),
                phase=phase,
                step=step,
            )

    def shutdown(self) -> None:
        """Asks every actor to close its groups (all at once, bounded), then kills it.

        Raises:
            ActorNotDeadError: Some actor was not confirmed dead (see :meth:`kill`).
        """
        live = [a for a, h in self._handles.items() if h is not None]
        refs = [self._handles[a].shutdown.remote() for a in live]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=30)  # best effort before the kill
        self.kill(*live, phase="shutdown", step=-1)


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone; the confirmation says so or not
        pass


def await_deaths(handles: dict[str, object], timeout_s: float) -> dict[str, str]:
    """Waits until Ray reports each actor DEAD and its process is gone, within ``timeout_s``.

    Ray's actor table (GCS; no dashboard needed) gives the state, the pid and the node; the
    process is looked up on this node directly, on another node by a task pinned there.

    Args:
        handles: Actor handles by name (already killed, or dead).
        timeout_s: One deadline for them all.

    Returns:
        For each actor not confirmed dead in time, what was last seen of it (empty: all dead).
    """
    deadline = time.monotonic() + timeout_s
    seen = {name: "not looked at" for name in handles}
    waiting = dict(handles)
    while True:
        for name, handle in list(waiting.items()):
            gone, seen[name] = _confirmed_dead(handle, deadline)
            if gone:
                del waiting[name]
        if not waiting or time.monotonic() >= deadline:
            return {name: seen[name] for name in waiting}
        time.sleep(_POLL_S)


def _confirmed_dead(handle, deadline: float) -> tuple[bool, str]:
    """Whether the actor is DEAD with its process gone; else what was seen."""
    from ray._private import state  # the GCS actor table: ray.util.state needs the dashboard

    record = state.actors(handle._actor_id.hex())
    if not record:
        return True, "unknown to Ray"
    if record.get("State") != "DEAD":
        return False, f"Ray reports it {record.get('State')}"
    pid = int(record.get("Pid") or 0)
    if pid == 0:  # never had a process (killed before it was placed)
        return True, "dead, never placed"
    end_s = float(record.get("EndTime") or 0) / 1000.0
    node = (record.get("Address") or {}).get("NodeID")
    if node == ray.get_runtime_context().get_node_id():
        alive = _process_alive(pid, end_s)
    else:
        alive = _process_alive_on(node, pid, end_s, deadline)
    if alive is None:
        return False, f"DEAD, but node {node} did not say whether pid {pid} exited"
    return (not alive), (f"DEAD, pid {pid} still running" if alive else "dead")


def _process_alive(pid: int, dead_since_s: float) -> bool:
    """Whether ``pid`` still runs the actor.

    A zombie has freed its memory; a process created after the actor died reuses the pid.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= dead_since_s
    except psutil.NoSuchProcess:
        return False


def _process_alive_on(node: str, pid: int, dead_since_s: float, deadline: float) -> bool | None:
    """:func:`_process_alive` on ``node``, answered by a task pinned there (None: no answer)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_process_alive).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
    )
    ref = task.remote(pid, dead_since_s)
    ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
    if not ready:
        ray.cancel(ref, force=True)
        return None
    try:
        return ray.get(ref)
    except (ray.exceptions.NodeDiedError, ray.exceptions.TaskUnschedulableError):
        return False  # the node itself is gone: so is the process
    except ray.exceptions.RayError:
        return None


def _fresh() -> str:
    import uuid

    return uuid.uuid4().hex[:6]
