"""Roles: the extra tenants of an RLHF pipeline, and the base class of a user's own.

A role is a named group of actors, one rank per GPU of its bundles (by default beside the
trainer ranks), whose GPU memory the coordinator orders like the engines' and the trainers':
from the hand-over table (``colocate.core.handovers``), on every GPU, every release before any
acquisition. A role names the phases it is resident in (:attr:`Role.phases`): when a row reaches
one of them its ranks ``reload``; when a row reaches another, its ranks on shared GPUs
``offload`` before anything there acquires.

Built in: the reference policy (``colocate.roles.reference``) and the reward model
(``colocate.roles.reward_model``), both resident in SCORE, both parameterising
``colocate.roles.frozen.FrozenModelActor`` (a user's frozen model can too). A user's tenant
subclasses :class:`RoleActor`: it overrides :meth:`RoleActor.build` (its model, in host memory)
and adds its own public methods, which the driver calls with ``Coordinator.call_role`` by naming
the method itself (``MyJudge.score``), never a string.

Life of a role's rank:

1. created on its bundle with ``(config, rank, world_size, name, lane, env)``;
2. ``start`` (the ``init`` row, once the engines on its GPU slept): :meth:`RoleActor.build`
   in host memory; OFFLOADED (a collective role, e.g. the critic, first joins its group);
3. ``reload`` / ``offload`` as the rows of the table decide (idempotent);
4. its verbs, only while RESIDENT (:meth:`RoleActor.require_resident`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from colocate.algorithms.metrics import merge_metrics
from colocate.core.config import ConfigError
from colocate.core.contract import RoleTenant, Seat
from colocate.core.errors import ActorStateError
from colocate.core.faults import Fault, coerce_fault
from colocate.core.phases import Phase, RoleMemory
from colocate.operations.memory_plan import RoleFootprint
from placement import RoleSpec, TenantKind, TopologyError

__all__ = [
    "Role",
    "RoleActor",
    "micro_batches",
    "takes_max_rows",
    "wants_max_rows",
    "RESIDENT_PHASES",
]

#: The phases a role may be resident in (the loop's phases).
RESIDENT_PHASES = frozenset({Phase.ROLLOUT, Phase.SCORE, Phase.TRAIN, Phase.SYNC})
_MEMORY_VERBS = frozenset({"start", "offload", "reload", "host_group_store"})
_MAX_ROWS = "__colocate_max_rows__"

Verb = TypeVar("Verb", bound=Callable[..., Any])


def takes_max_rows(verb: Verb) -> Verb:
    """Declares that a role verb plans from the largest shard: ``verb(self, shard, max_rows)``.

    A sharded call (``Coordinator.call_role(role, verb, batch)``) then passes every rank its
    own shard and, right after it, the largest shard's row count, which the driver knows since
    it cut the batch: every rank of a collective role plans the same number of micro-batches
    (ZeRO-3 gathers run in step), as the policy's trainer ranks are told by the coordinator,
    with no collective of their own to agree on it. An unsharded call passes its arguments as
    given: every rank has the same rows, and the verb's ``max_rows`` (default None) means its
    own.
    """
    setattr(verb, _MAX_ROWS, True)
    return verb


def wants_max_rows(verb: Callable[..., Any]) -> bool:
    """Whether ``verb`` was declared with :func:`takes_max_rows`."""
    return bool(getattr(verb, _MAX_ROWS, False))


@dataclass(frozen=True)
class Role:
    """One role of a pipeline: who its actors are, where they sit, when they are resident.

    Attributes:
        name: Lower-case letters and ``_``; its actors are ``<name><rank>``.
        actor: The actor class (a :class:`~colocate.core.contract.RoleTenant`, usually a
            :class:`RoleActor` subclass).
        config: Passed to every rank's constructor (a frozen dataclass is best).
        phases: The phases it must be resident in (any of ROLLOUT, SCORE, TRAIN, SYNC).
        bundles: The GPUs it takes, one rank each; None: one rank beside each trainer rank.
        gpu_fraction: Ray ``num_gpus`` of each of its actors.
    """

    name: str
    actor: type
    config: Any = None
    phases: frozenset[Phase] = field(default_factory=lambda: frozenset({Phase.SCORE}))
    bundles: tuple[int, ...] | None = None
    gpu_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.actor, type) and issubclass(self.actor, RoleTenant)):
            raise ConfigError(
                f"Role({self.name!r}).actor={self.actor!r}: must subclass "
                "colocate.core.contract.RoleTenant; fix: subclass colocate.roles.base.RoleActor"
            )
        phases = self.phases
        if (
            not isinstance(phases, frozenset)
            or not phases
            or not all(isinstance(p, Phase) for p in phases)
            or not phases <= RESIDENT_PHASES
        ):
            allowed = sorted(p.value for p in RESIDENT_PHASES)
            raise ConfigError(
                f"Role({self.name!r}).phases={phases!r}: must be a non-empty frozenset of "
                f"colocate.Phase among {allowed}; fix: e.g. frozenset({{Phase.SCORE}})"
            )
        try:
            self.placement  # noqa: B018 - validates name, bundles and fraction now
        except TopologyError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def placement(self) -> RoleSpec:
        """Where the role sits, for the planner."""
        return RoleSpec(self.name, self.bundles, self.gpu_fraction)


def micro_batches(batch: dict, size: int) -> Iterator[dict]:
    """The rows of ``batch`` (a dict of tensors or lists, one row each) ``size`` at a time."""
    from colocate.algorithms.batches import batch_rows, slice_rows

    for start in range(0, batch_rows(batch), size):
        yield slice_rows(batch, start, start + size)


class RoleActor(RoleTenant):
    """A role's rank around one torch module, moved between host memory and its GPU.

    Subclass it: override :meth:`build` (and :meth:`check_config`, run in the driver before
    anything starts), add the role's verbs, and begin each with :meth:`require_resident`.
    Other state than ``self.module`` (an optimizer, a cache) is moved by overriding
    :meth:`release` and :meth:`acquire`. A role whose ranks form a group of their own sets
    :attr:`collective`: the coordinator has its rank 0 host the group's store first; its verbs
    that must run in step on uneven shards declare :func:`takes_max_rows`.

    Args:
        seat: Its seat: ``group`` the role's name, ``config`` its :attr:`Role.config`, its
            ``rank`` and ``world_size``, ``lanes`` its GPU, ``env`` the environment set before
            anything is imported (passed by the coordinator).
    """

    def __init__(self, seat: Seat):
        super().__init__(seat)  # sets the environment first
        self.rank = seat.rank
        self.world_size = seat.world_size
        self.lane = seat.lanes[0]
        self.memory = RoleMemory.OFFLOADED
        self.module: torch.nn.Module | None = None
        self.started = False
        self.role = seat.group
        self._group_store: tuple | None = None
        # Where this rank runs is a fact of the worker it runs in, not of the driver.
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    @classmethod
    def check_config(cls, config: Any, policy_model: str) -> None:
        """Driver-side check before anything starts (raise ``ConfigError``); default: none.

        Args:
            config: The role's config.
            policy_model: The policy's local model directory (to compare vocabularies).
        """

    @classmethod
    def footprint(cls, config: Any) -> RoleFootprint:
        """What one rank holds on its GPU, for the memory plan (in the driver, no actor).

        Override it in a role of your own: :meth:`RoleFootprint.frozen` for a frozen,
        forward-only model (``colocate.operations.memory_plan.model_shape(dir)`` reads its shape
        from the ``config.json`` without loading weights), :meth:`RoleFootprint.trainer` for one
        with its own ZeRO optimizer, or :meth:`RoleFootprint.declared` with a byte figure.
        Default: unknown; the plan counts only the rank's process and says the model is not
        counted.

        Args:
            config: The role's :attr:`Role.config`.
        """
        return RoleFootprint.unknown()

    def build(self) -> torch.nn.Module | None:
        """The role's model, in host memory (called once, by :meth:`start`). Default: None."""
        return None

    def join(self, master: tuple[str, int] | None) -> RoleMemory:
        """Builds the role; a collective role joins its group at ``master`` first.

        Default: :meth:`build` in host memory (OFFLOADED). A collective role overrides this.
        """
        self.module = self.build()
        if self.module is not None:
            self.module.eval()
        return RoleMemory.OFFLOADED

    def release(self) -> None:
        """Moves the role's state to host memory (default: ``self.module``, on CUDA only)."""
        if self.device.type == "cuda" and self.module is not None:
            self.module.to("cpu")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def acquire(self) -> None:
        """Moves the role's state to its GPU (default: ``self.module``, on CUDA only)."""
        if self.device.type == "cuda" and self.module is not None:
            self.module.to(self.device)

    # ----- memory mechanisms (the coordinator's) ------------------------------------------------

    def host_group_store(self, multi_node: bool, timeout_s: float) -> tuple[str, int]:
        """Rank 0 of a collective role: starts its group's store; returns (host, port)."""
        import ray

        from weight_sync.store import host_store

        host = ray.util.get_node_ip_address() if multi_node else "127.0.0.1"
        store, port, sock = host_store(host, self.world_size, timeout_s, key=f"{self.role}-group")
        self._group_store = (store, sock)
        return host, port

    def start(self, groups: tuple = ()) -> RoleMemory:
        """Builds the role (:meth:`join`); returns the state reached. Idempotent."""
        if not self.started:
            with self.span("role.start"):
                self.memory = self.join(dict(groups).get(self.role))
            self.started = True
        return self.memory

    def offload(self) -> RoleMemory:
        """Moves the role's state to host memory (on a CPU device nothing moves). Idempotent."""
        if self.memory is RoleMemory.RESIDENT:
            with self.span("role.offload"):
                self.release()
            self.memory = RoleMemory.OFFLOADED
        return self.memory

    def reload(self) -> RoleMemory:
        """Moves the role's state to its GPU. Idempotent."""
        if not self.started:
            raise ActorStateError(f"{self.name}: reload before start")
        if self.memory is RoleMemory.OFFLOADED:
            with self.span("role.reload"):
                self.acquire()
            self.memory = RoleMemory.RESIDENT
        return self.memory

    def require_resident(self, action: str) -> None:
        """Raises unless the role is resident (a verb never runs on offloaded state)."""
        if self.memory is not RoleMemory.RESIDENT:
            raise ActorStateError(
                f"{self.name}: {action} needs the role resident, it is {self.memory.value}"
            )

    def invoke(self, verb: str, args: tuple, tag, *after: Any):
        """Runs one verb (see :meth:`Tenant.invoke`).

        An armed ``CRASH_IN_ROLE_CALL`` fires at the start of the next verb that is not a
        memory mechanism.
        """
        if verb not in _MEMORY_VERBS:
            self._maybe_crash(Fault.CRASH_IN_ROLE_CALL)
        return super().invoke(verb, args, tag, *after)

    # ----- housekeeping -------------------------------------------------------------------------

    def status(self) -> dict:
        """Name, memory state, pid, RSS, open fds and threads."""
        from colocate.operations.memory import process_stats

        return {"name": self.name, "memory": self.memory.value, **process_stats()}

    def inject_fault(self, fault: Fault) -> None:
        """Arms a role fault (test hook): ``CRASH_IN_ROLE_CALL``."""
        fault = coerce_fault(fault)
        if fault.kind is not TenantKind.ROLE:
            raise ValueError(f"{self.name}: {fault.value} is a {fault.kind.value} fault")
        self._faults.add(fault)

    def shutdown(self) -> None:
        """Drops the module and closes the group's store. Idempotent."""
        self.module = None
        self.started = False
        if self._group_store is not None:
            self._group_store[1].close()
            self._group_store = None


def attach_roles(spec, roles, policy_model: str):
    """``spec`` with the roles' placements, after checking every role (before any actor).

    Order: each is a :class:`Role`; names are unique; the spec names no roles of its own (they
    come from here); the placements are validated by the planner's spec
    (``TopologySpec.roles``: bundles exist, fractions per GPU sum to at most 1); then each
    role's ``check_config`` runs against the policy's model directory.

    Raises:
        ConfigError: A role's type, config or model (vocabulary, head) is wrong.
        TopologyError: Its placement is (bundles, fractions).
    """
    import dataclasses

    roles = tuple(roles)
    for r in roles:
        if not isinstance(r, Role):
            raise ConfigError(
                f"roles: {r!r} is not a colocate.Role; fix: pass Role(...) objects, e.g. "
                "reference_role(path)"
            )
    if not roles:
        return spec
    if spec.roles:
        raise ConfigError(
            f"TopologySpec.roles={spec.roles!r} and Coordinator(roles=...) both given; fix: "
            "pass the roles to the Coordinator only (it places them)"
        )
    spec = dataclasses.replace(spec, roles=tuple(r.placement for r in roles))
    for r in roles:
        r.actor.check_config(r.config, policy_model)
    return spec


def split_rows(
    batch: dict, world: int, by_tokens: bool = False
) -> tuple[list[dict], list[int] | None]:
    """``batch`` cut into ``world`` shards (as the trainer's), one per rank.

    Contiguous rows; ``by_tokens``: near-equal tokens (``shard_by_tokens``).

    Returns:
        ``(shards, order)``: ``order`` the batch's rows as the shards hold them (None when
        contiguous), for :func:`merge_rows`.
    """
    from colocate.algorithms.batches import shard_batch, shard_by_tokens

    if by_tokens:
        return shard_by_tokens(batch, world)
    return [shard_batch(batch, r, world) for r in range(world)], None


def merge_rows(results: list, order: list[int] | None = None) -> Any:
    """The ranks' answers to their shards, merged.

    Tensors, lists or tuples are concatenated in rank order, then put back in the batch's row
    order when the shards held ``order`` (:func:`split_rows`); dicts of numbers (metrics) are
    averaged over the ranks, key by key (``*_max`` metrics take the maximum:
    ``colocate.algorithms.metrics.merge_metrics``).
    """
    first = results[0]
    if isinstance(first, dict):
        return merge_metrics(results)
    back = None if order is None else torch.tensor(order).argsort()
    if isinstance(first, torch.Tensor):
        merged = torch.cat(results)
        return merged if back is None else merged[back]
    if isinstance(first, (list, tuple)):
        merged = [x for r in results for x in r]
        return merged if back is None else [merged[i] for i in back.tolist()]
    raise TypeError(
        f"a sharded role call returned {type(first).__name__}; fix: return a tensor, a list "
        "with one entry per row or a dict of metrics, or call with shard=False"
    )
