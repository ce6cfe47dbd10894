"""The written-down contract between the coordinator and the actors it drives.

One base class per kind of tenant: :class:`Tenant` (what every actor answers to),
:class:`EngineTenant`, :class:`TrainerTenant` and :class:`RoleTenant` (an extra tenant: a
reference policy, a reward model, a critic, or a user's own actor).
``colocate.actors.engine.EngineActor``, ``colocate.actors.trainer.TrainerActor`` and
``colocate.roles.base.RoleActor`` implement them; a user's subclass of any of them
(``Coordinator(engine_cls=..., trainer_cls=..., roles=...)``) must keep the signatures below.

One constructor for every tenant: ``cls(seat)``, where the :class:`Seat` says which group the
actor belongs to, its rank, its GPUs, the group's config and the environment to set first.

How a call arrives. The driver never names a method by a string: it builds a
:class:`colocate.core.calls.Call` from the method itself (``EngineTenant.sleep``), whose arguments
are checked against this signature before anything is sent. Ray then runs
:meth:`Tenant.invoke` in the actor, which sets the call's timeline tag (phase, step) and calls
the method; hand-over dependencies (results of releases an acquisition waits for) are Ray
arguments of ``invoke`` and never reach the method. A method records its timeline span with
:meth:`Tenant.span`, which uses the tag of the call it runs in.

Rules every implementation keeps:

- Memory methods are idempotent: sleeping a sleeping engine, offloading an offloaded trainer,
  reloading a loaded one does nothing, records nothing, and returns the state it is in.
- Memory methods return the memory state reached (:class:`~colocate.core.phases.EngineMemory` or
  :class:`~colocate.core.phases.TrainerMemory`); the coordinator checks it against the phase table.
- A method that needs a memory state it is not in raises (it never reads freed memory).
- Input the caller got wrong raises :class:`~colocate.core.errors.InputError` (the actor stays
  healthy); anything else is reported as the actor's failure.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from colocate.core.faults import Fault
from colocate.core.phases import EngineMemory, RoleMemory, TrainerMemory
from colocate.operations.timeline import Recorder, Span

__all__ = [
    "Tag",
    "Seat",
    "Tenant",
    "EngineTenant",
    "TrainerTenant",
    "RoleTenant",
    "Completion",
    "PartialRequest",
    "EngineCapabilities",
    "Receipt",
    "Reply",
    "StepFailed",
    "verbs_of",
]

#: (phase or transition name, RL step, hand-over sequence number): the spans of one hand-over
#: share it on the timeline (the sequence number tells apart two hand-overs of one row and step,
#: e.g. a sync and the sync of a recovery).
Tag = tuple[str, int, int]

_DIRECT: Tag = ("direct", 0, 0)


@dataclass(frozen=True)
class Seat:
    """One actor of a tenant group: what every tenant's constructor takes.

    Attributes:
        group: The group's name (``"engine"``, ``"trainer"``, a role's name).
        rank: This actor's index in its group.
        world_size: The group's ranks.
        lanes: Its GPUs (bundle indices; an engine's TP workers in TP-rank order).
        config: The group's configuration.
        env: Environment set in the actor's process before anything else is imported (chosen
            by the coordinator from the bundles' device).
        loss_fn: What the policy's trainer ranks train with (a module-level function, so Ray
            can ship it); None for every other group.
    """

    group: str
    rank: int
    world_size: int
    lanes: tuple[int, ...]
    config: Any = None
    env: dict[str, str] = field(default_factory=dict)
    loss_fn: Callable | None = None

    @property
    def name(self) -> str:
        """The actor's name, for errors and its timeline lane (``"engine0"``, ``"critic1"``)."""
        return f"{self.group}{self.rank}"


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do on its platform (reported by the engine, from its worker)."""

    platform: str
    device_type: str
    sleep_supported: bool
    tensor_parallel_size: int


@dataclass(frozen=True)
class Receipt:
    """What an engine received in one sync.

    Attributes:
        version: The version it took (after verifying, if asked to).
        workers: One ``weight_sync.ReceiveReport`` per TP worker.
        verified: Received tensors compared with the sender's manifest (all workers).
        applied: Applied parameters compared with what their members sum to.
    """

    version: int
    workers: list
    verified: int = 0
    applied: int = 0


@dataclass(frozen=True)
class Completion:
    """One sampled completion, tagged with the weight version that produced it."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str | None
    weight_version: int
    #: ``(weight version, tokens)`` runs over ``token_ids`` (a partial rollout's completion
    #: may span versions; ``weight_version`` is then the oldest). Empty: all ``weight_version``.
    weight_versions: tuple[tuple[int, int], ...] = ()
    #: Per token of ``token_ids``: 1 where the model sampled it (trained), 0 where an
    #: environment appended it (a multi-turn episode's observations: no log-prob, never in
    #: the loss). Empty: every token is sampled.
    loss_mask: tuple[int, ...] = ()


@dataclass(frozen=True)
class PartialRequest:
    """One completion of a prompt group in a partial rollout, as far as it has got.

    It crosses the hand-over: the engine returns the tokens it had when the rollout stopped,
    and a later rollout resumes from them (prompt + kept tokens re-prefilled under the newer
    weights; the kept tokens are never decoded and re-encoded).

    Attributes:
        group: The prompt group's id (unique over the run).
        sample: Its index in the group.
        prompt_token_ids: The prompt (empty until the engine tokenized ``prompt``).
        prompt: The prompt's text, when given as text.
        token_ids: Generated tokens so far.
        logprobs: Each generated token's log-prob under the weights that sampled it.
        spans: ``(weight version, tokens)`` runs over ``token_ids``, in order.
        finish_reason: vLLM's, once finished; None while unfinished.
    """

    group: int
    sample: int
    prompt_token_ids: tuple[int, ...]
    prompt: str | None = None
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        """Finished (stopped, or reached ``max_tokens``)."""
        return self.finish_reason is not None

    @property
    def oldest_version(self) -> int | None:
        """The oldest weight version among its tokens (None before its first token)."""
        return self.spans[0][0] if self.spans else None


@dataclass(frozen=True)
class Reply:
    """What :meth:`Tenant.invoke` returns: the method's value and the spans recorded since.

    Spans travel with every answer, so collecting the timeline costs no calls of its own
    (``colocate.core.calls.wait_all`` unwraps replies and hands the spans over).
    """

    value: Any
    spans: list


class StepFailed(Exception):  # noqa: N818 - it carries the step's own error, not a new one
    """Step ``index`` of an :meth:`Tenant.invoke_many` program raised ``error``."""

    def __init__(self, index: int, error: BaseException):
        super().__init__(index, error)
        self.index = index
        self.error = error

    def __str__(self) -> str:
        return f"step {self.index}: {type(self.error).__name__}: {self.error}"


def verbs_of(cls: type) -> frozenset[str]:
    """The public methods of a contract class and its bases: what ``invoke`` may run."""
    return frozenset(
        name
        for klass in cls.__mro__
        for name, value in vars(klass).items()
        if inspect.isfunction(value)
        and not name.startswith("_")
        and name not in ("invoke", "invoke_many")
    )


class Tenant(ABC):
    """What every actor the coordinator drives answers to.

    Every tenant is constructed as ``cls(seat)``. The base sets the seat's environment first,
    before a subclass imports anything that reads it (vLLM, DeepSpeed).

    Args:
        seat: Who this actor is, where it sits, and its group's configuration.
    """

    #: The verbs :meth:`invoke` may run: a kind's contract methods (set by each kind); None
    #: allows the public methods of the actor's own class (a user-defined tenant).
    verbs: frozenset[str] | None = None
    #: Declared capability: the ranks form a torch.distributed group of their own; rank 0
    #: hosts its store (``host_group_store(multi_node, timeout_s)``) before they start, and
    #: losing one rank loses the group (every rank is replaced).
    collective: bool = False
    #: Declared capability: it holds trained state; ``save(path)`` and ``load(path)`` write and
    #: restore it (``Coordinator.save_trainer``, ``resume``, ``recover(checkpoint=...)``).
    stateful: bool = False
    #: Declared capability: it takes optimizer steps.
    trainable: bool = False

    def __init__(self, seat: Seat):
        os.environ.update(seat.env)
        self.seat = seat
        self.name = seat.name
        self.config = seat.config
        self.recorder = Recorder(seat.name, seat.lanes)
        self._tag: Tag = _DIRECT
        self._faults: set[Fault] = set()

    def invoke(self, verb: str, args: tuple, tag: Tag, *after: Any) -> Reply:
        """Runs one contract method under ``tag``: how the coordinator calls every verb.

        (The fleet's housekeeping calls, ``status``, ``drain_spans`` and ``shutdown``, are
        made directly: they are no verbs and record no spans.)

        ``verb`` is the method's own ``__name__``, taken by the driver from the method object.
        ``after`` holds the results of the calls this one waited for (Ray resolved them before
        scheduling it): they only order the call and are not passed on.
        """
        allowed = self.verbs if self.verbs is not None else verbs_of(type(self))
        if verb not in allowed:
            raise AttributeError(f"{self.name}: {verb!r} is not a verb of {type(self).__name__}")
        self._tag = tag
        try:
            value = getattr(self, verb)(*args)
        finally:
            self._tag = _DIRECT
        return Reply(value, self.recorder.drain())

    def invoke_many(self, program: tuple, *after: Any) -> Reply:
        """Runs several contract methods in order: ``program`` is ``(verb, args, tag)`` each.

        What the driver sends instead of consecutive calls to one actor when none of them
        waits for more than the first one does and nothing waits for the ones before the
        last (``colocate.core.calls.Chain`` decides): one Ray call instead of several. A step that
        raises stops the program; the error says which step (:class:`StepFailed`).
        """
        values, spans = [], []
        for i, (verb, args, tag) in enumerate(program):
            try:
                reply = self.invoke(verb, args, tag, *after)
            except Exception as exc:
                raise StepFailed(i, exc) from exc
            values.append(reply.value)
            spans.extend(reply.spans)
        return Reply(values, spans)

    @contextlib.contextmanager
    def span(self, name: str, **detail: Any) -> Iterator[dict]:
        """Records timeline span ``name`` around the block, under the current call's tag."""
        with self.recorder.span(name, self._tag, **detail) as d:
            yield d

    def drain_spans(self) -> list[Span]:
        """Timeline spans recorded since the last drain."""
        return self.recorder.drain()

    @abstractmethod
    def status(self) -> dict:
        """Name, memory state, pid, RSS, open fds and threads (health checks and soak)."""

    @abstractmethod
    def inject_fault(self, fault: Fault) -> None:
        """Arms ``fault`` (test hook); refuses a fault of another kind of actor."""

    @abstractmethod
    def shutdown(self) -> None:
        """Leaves every group and frees what the actor holds. Idempotent; called before a kill."""

    def _maybe_crash(self, fault: Fault) -> None:
        if fault in self._faults:
            os._exit(1)  # as a kill would: no cleanup, no reply


class EngineTenant(Tenant):
    """An inference engine (vLLM): generation, sleep/wake, and the receiving side of a sync."""

    @abstractmethod
    def start(self) -> EngineCapabilities:
        """Builds the engine (weights and KV cache allocated: awake). Idempotent."""

    @abstractmethod
    def sleep(self, level: int) -> EngineMemory:
        """Releases the KV cache and the weights (level 1 keeps a host copy, level 2 drops it)."""

    @abstractmethod
    def wake_weights(self) -> EngineMemory:
        """Re-allocates the weights only (no KV cache), ready to receive a sync."""

    @abstractmethod
    def wake_kv(self) -> EngineMemory:
        """Re-allocates the KV cache and resets the prefix cache; the engine can serve again."""

    @abstractmethod
    def generate(self, prompts: list, sampling: Any, first_index: int) -> list[Completion]:
        """``sampling.n`` completions per prompt, prompt-major; needs the engine awake.

        ``first_index`` is the ``prompt_index`` of the first prompt (its place in the batch).
        """

    @abstractmethod
    def rollout(
        self, requests: list[PartialRequest], sampling: Any, groups: int, finish: frozenset
    ) -> list[PartialRequest]:
        """Continues ``requests`` until ``groups`` of their groups are finished; keeps the rest.

        Every request (one completion; ``sampling.n`` is not used) is generated from its
        prompt plus its kept tokens, for at most ``sampling.max_tokens`` tokens in all. Once
        every request of ``groups`` groups is done and every request of a group in ``finish``
        too, the others are aborted with their tokens and log-probs kept. Needs the engine
        awake.

        Returns:
            Every request, updated (new tokens tagged with this engine's weight version).
        """

    def run_episodes(
        self, starts: list, sampling: Any, agent: Any, groups: int | None, alone: bool = False
    ) -> list:
        """Runs agent episodes (``colocate.agents``) on this engine, each at its own pace.

        ``starts`` (``EpisodeStart``) join the episodes paused here by an earlier call; each
        turn samples at most ``agent.turn_tokens`` tokens with ``sampling`` (``n`` is not
        used: one episode per start). With ``groups`` None every episode runs to its end;
        otherwise the call returns once ``groups`` prompt groups are done, and the other
        episodes are paused here (the turn in the engine aborted with its tokens kept, the
        environment steps settled) until the next call. Nothing runs in the engine when it
        returns. With ``alone`` (evaluation) only ``starts`` run, each to its end, and the
        paused episodes are left as they are. Needs the engine awake.

        Returns:
            ``EpisodeResult`` of every episode of each finished group, group by group.

        The default refuses: an engine without an agent loop (a test double) runs none.
        """
        raise NotImplementedError(f"{type(self).__name__} runs no agent episodes")

    @abstractmethod
    def expected_weights(self) -> Any:
        """What the engine's model expects: a ``weight_sync.EngineWeights``.

        Every checkpoint tensor the model declares (``TensorMeta``), the engine model's packing
        and its parameter names, read where the model is.
        """

    @abstractmethod
    def setup_sync(self, setup: Any) -> list[dict]:
        """Every worker joins its transfer group (``weight_sync.ReceiverSetup``)."""

    @abstractmethod
    def receive_weights(self, request: Any) -> Receipt:
        """Every worker receives, applies and (when asked) verifies one sync.

        Verifying: every worker compares what it received with the sender's manifest (which
        came through the transport), and the engine every readable applied parameter with
        what its fused members sum to; a mismatch raises ``VerificationError`` naming the
        tensor. Only then does the engine take ``request.version``.
        """


EngineTenant.verbs = verbs_of(EngineTenant)


class TrainerTenant(Tenant):
    """One trainer rank: training, offload/reload, and the sending side of a sync.

    Collective methods (``prepare``, ``start``, ``train_step``, ``send_weights`` under ZeRO-3,
    ``param_fingerprints``, ``save``, ``load``, ``export_hf``) are called on every rank at once.
    """

    collective = True
    stateful = True
    trainable = True

    @abstractmethod
    def host_group_store(self, multi_node: bool, timeout_s: float) -> tuple[str, int]:
        """Rank 0 only: starts the trainer group's store; returns its (host, port)."""

    def prepare(self, master: tuple[str, int], timeout_s: float) -> dict:
        """The part of :meth:`start` that takes no device memory; returns what it did.

        The coordinator runs it waiting for nothing (row ``init``, submitted while the engines
        on the rank's GPU still start, before they sleep): it may import, load built ops and
        join the trainer group, but must allocate nothing on the device (the process's own
        fixed cost aside, which the memory plan counts in every phase). :meth:`start` (same
        row, after the engines there slept) then does the rest, and does the preparation
        itself if it has not run. Idempotent.

        The default prepares nothing: a trainer that does not split its start does it all in
        :meth:`start`.
        """
        return {}

    @abstractmethod
    def start(self, master: tuple[str, int], timeout_s: float) -> dict:
        """Joins the trainer group, builds model and optimizer (holds everything). Idempotent.

        Runs :meth:`prepare` first if it has not run (same ``master``).
        """

    @abstractmethod
    def train_step(self, shard: dict, max_rows: int | None = None) -> dict[str, float]:
        """The optimizer steps of one train call on this rank's shard; needs everything resident.

        ``max_rows`` is the largest rank's shard (every rank plans the same number of
        micro-batches from it; ``colocate.algorithms.micro_batches``); None: this shard's rows.
        """

    @abstractmethod
    def offload(self, keep_params: bool) -> TrainerMemory:
        """Moves training state to host memory; with ``keep_params`` the params stay."""

    @abstractmethod
    def reload(self) -> TrainerMemory:
        """Brings every offloaded state back to the device."""

    @abstractmethod
    def node_address(self, multi_node: bool) -> str:
        """The address this rank's listeners bind to (loopback on a single node)."""

    @abstractmethod
    def weight_metas(self, dtype: Any) -> list:
        """``TensorMeta`` of every weight to send, as the engine receives it."""

    @abstractmethod
    def host_sync_store(self, host: str, world_size: int, key: str, timeout_s: float) -> int:
        """Starts one transfer group's store on this rank; returns its port."""

    @abstractmethod
    def setup_sync(self, plan: Any, rendezvous: list) -> bool:
        """Builds this rank's sender over the given rendezvous (concurrently with receivers)."""

    @abstractmethod
    def send_weights(self, request: Any) -> Any:
        """Streams every bucket of one sync; returns this rank's ``SendReport``."""

    @abstractmethod
    def close_sync_stores(self) -> None:
        """Closes the sender and the stores this rank hosts. Idempotent."""

    @abstractmethod
    def param_fingerprints(self, chunk_bytes: int = 256 << 20) -> dict:
        """Fingerprints of every full parameter, as stored (gathered ``chunk_bytes`` at a time)."""

    @abstractmethod
    def save(self, path: str) -> str:
        """Checkpoints model, optimizer and step count under ``path``."""

    @abstractmethod
    def load(self, path: str) -> int:
        """Restores a checkpoint written by :meth:`save`; returns the step count."""

    @abstractmethod
    def export_hf(self, path: str, dtype: str, chunk_bytes: int = 256 << 20) -> str | None:
        """Writes the current weights as an HF model directory (rank 0 writes).

        Streamed: at most ``chunk_bytes`` of parameters gathered at a time.
        """


TrainerTenant.verbs = verbs_of(TrainerTenant)


class RoleTenant(Tenant):
    """One rank of a role: memory mechanisms the coordinator orders, plus the role's own verbs.

    The coordinator calls :meth:`start` once (in the ``init`` row, after the engines on its GPU
    slept, with the trainer ranks), then :meth:`reload` when a phase the role is
    resident in begins on its GPU (after the other tenants there released) and
    :meth:`offload` when one it is not resident in begins (before the others acquire). Every
    other public method of the actor's class is a verb the driver may call
    (``Coordinator.call_role``); it may assume the role is resident.
    """

    #: None: the public methods of the actor's own class (the role's own verbs) may be invoked.
    #: Its capabilities (``collective``, ``stateful``, ``trainable``) are declared as on every
    #: :class:`Tenant`: a stateful role is saved under ``<path>/<role>``.
    verbs = None

    #: Where :meth:`token_budget` reads the budget in the role's config (for errors).
    token_budget_field = "max_tokens_per_micro_batch"

    @classmethod
    def token_budget(cls, config: Any) -> int | None:
        """Most tokens per packed forward, or None for padded rows (driver side). Default: None.

        A role with a budget gets shards of near-equal tokens from a sharded call
        (``colocate.algorithms.batches.shard_by_tokens``), its answers put back in row order,
        and ``RunConfig`` refuses a budget below the engines' ``max_model_len``.
        """
        return None

    @abstractmethod
    def start(self, groups: tuple) -> RoleMemory:
        """Builds the role's state; returns the state reached. Idempotent.

        ``groups`` holds ``(role name, (host, port))`` of every collective role's group store
        (hosted by its rank 0, ``colocate.roles.base.RoleActor.host_group_store``); a role that
        trains across ranks (the critic) joins its own group there.
        """

    @abstractmethod
    def offload(self) -> RoleMemory:
        """Gives the GPU memory back (host copy, or dropped if it can be rebuilt). Idempotent."""

    @abstractmethod
    def reload(self) -> RoleMemory:
        """Takes the GPU memory the role runs in. Idempotent."""
