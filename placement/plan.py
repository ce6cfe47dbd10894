"""The pure planner: which trainer rank and engine TP rank sits on which bundle (one per GPU)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from placement.spec import ClusterInfo, TopologyError, TopologySpec

__all__ = ["TenantKind", "Tenant", "BundleSlot", "Plan", "plan"]


class TenantKind(enum.Enum):
    """What kind of actor holds a share of a GPU."""

    TRAINER = "trainer"
    ENGINE = "engine"
    ROLE = "role"  # an extra tenant (reference, reward model, critic, a user's actor)


@dataclass(frozen=True, order=True)
class Tenant:
    """One actor's share of one GPU.

    A trainer rank, TP rank ``tp_rank`` of engine ``index``, or rank ``index`` of role ``role``.
    """

    kind: TenantKind
    index: int
    tp_rank: int = 0
    role: str = ""

    def __str__(self) -> str:
        if self.kind is TenantKind.TRAINER:
            return f"trainer[{self.index}]"
        if self.kind is TenantKind.ROLE:
            return f"{self.role}[{self.index}]"
        return f"engine[{self.index}].tp{self.tp_rank}"


@dataclass(frozen=True)
class BundleSlot:
    """One placement-group bundle: one GPU of one node and the tenants that share it."""

    index: int
    node: int
    local_gpu: int
    tenants: tuple[Tenant, ...]
    cpus: float

    @property
    def resources(self) -> dict[str, float]:
        """The Ray bundle: one GPU and a (fractional) CPU share."""
        return {"GPU": 1.0, "CPU": self.cpus}

    @property
    def shared(self) -> bool:
        """True when more than one tenant uses this GPU (memory must be handed over)."""
        return len(self.tenants) > 1


@dataclass(frozen=True)
class Plan:
    """A validated assignment of tenants to bundles; bundle ``i`` is GPU ``i`` in node-major order.

    Invariants (checked by the tests on random specs): trainer ranks are in node-major order;
    all TP ranks of an engine are on one node; the tenants of a bundle share one GPU and their
    fractions sum to at most 1; every GPU of the spec is used.
    """

    spec: TopologySpec
    bundles: tuple[BundleSlot, ...]

    def trainer_bundle(self, rank: int) -> int:
        """Bundle index of trainer rank ``rank``."""
        if not 0 <= rank < self.spec.trainer_world_size:
            raise TopologyError(
                f"trainer rank={rank!r} is out of range; fix: use 0 <= rank < "
                f"trainer_world_size={self.spec.trainer_world_size}"
            )
        return self._index[Tenant(TenantKind.TRAINER, rank)]

    def engine_bundles(self, engine: int) -> tuple[int, ...]:
        """Bundle indices of engine ``engine``, one per TP rank, in TP-rank order."""
        if not 0 <= engine < self.spec.engines:
            raise TopologyError(
                f"engine={engine!r} is out of range; fix: use 0 <= engine < "
                f"engines={self.spec.engines}"
            )
        return tuple(
            self._index[Tenant(TenantKind.ENGINE, engine, r)] for r in range(self.spec.engine_tp)
        )

    def role_bundles(self, role: str) -> tuple[int, ...]:
        """Bundle indices of role ``role``, one per rank, in rank order."""
        found = [(t.index, b.index) for b in self.bundles for t in b.tenants if t.role == role]
        if not found:
            names = sorted({r.name for r in self.spec.roles})
            raise TopologyError(f"role={role!r} is not in the plan; fix: use one of {names}")
        return tuple(b for _, b in sorted(found))

    def role_fraction(self, role: str) -> float:
        """Ray ``num_gpus`` of each actor of role ``role``."""
        return next(r.gpu_fraction for r in self.spec.roles if r.name == role)

    def node_of(self, bundle: int) -> int:
        """Node index (0-based, node-major order) of bundle ``bundle``."""
        return self._bundle(bundle).node

    def tenants_of(self, bundle: int) -> tuple[Tenant, ...]:
        """The tenants that share bundle ``bundle``'s GPU."""
        return self._bundle(bundle).tenants

    def bundles_of_node(self, node: int) -> tuple[int, ...]:
        """Bundle indices on node ``node``, in local GPU order."""
        return tuple(b.index for b in self.bundles if b.node == node)

    @property
    def shared_bundles(self) -> tuple[int, ...]:
        """Bundles whose GPU is shared, i.e. where the coordinator must order memory hand-over."""
        return tuple(b.index for b in self.bundles if b.shared)

    @property
    def _index(self) -> dict[Tenant, int]:
        # Recomputed on demand: plans are small and frozen, and this keeps the dataclass plain.
        return {t: b.index for b in self.bundles for t in b.tenants}

    def _bundle(self, bundle: int) -> BundleSlot:
        if not 0 <= bundle < len(self.bundles):
            raise TopologyError(
                f"bundle={bundle!r} is out of range; fix: use 0 <= bundle < {len(self.bundles)}"
            )
        return self.bundles[bundle]


def plan(spec: TopologySpec, cluster: ClusterInfo | None = None) -> Plan:
    """Assigns trainer ranks and engine TP ranks to one bundle per GPU. Pure; never touches Ray.

    Order of assignment: bundles are numbered node-major (node 0's GPUs first). Trainer rank
    ``r`` takes bundle ``r``. Rank ``r`` of each role takes the ``r``-th of its bundles (by
    default the trainer's: rank ``r`` beside trainer rank ``r``). Colocated: engine ``e``
    takes the ``engine_tp`` consecutive bundles from ``e * engine_tp`` (TP divides the GPUs
    per node, so it never crosses a node).
    Separate pools: engines fill the bundles the trainer left, node by node, ``engine_tp`` at a
    time.

    Args:
        spec: The validated topology.
        cluster: If given, the running cluster's resources; a spec that cannot fit raises.

    Returns:
        The plan.

    Raises:
        TopologyError: The spec cannot be placed (names the field, the value and the fix).
    """
    if cluster is not None:
        cluster.check(spec)
    gpn = spec.gpus_per_node
    tenants: list[list[Tenant]] = [[] for _ in range(spec.total_gpus)]
    for rank in range(spec.trainer_world_size):
        tenants[rank].append(Tenant(TenantKind.TRAINER, rank))
    if spec.colocate:
        engine_slots = list(range(spec.total_gpus))
    else:
        # trainer_world_size = total - engines x tp is a multiple of tp (tp divides
        # gpus_per_node), so the node the trainer pool ends on has a multiple of tp GPUs free:
        # chunks of tp never cross a node boundary.
        engine_slots = list(range(spec.trainer_world_size, spec.total_gpus))
    for i, slot in enumerate(engine_slots):
        tenants[slot].append(Tenant(TenantKind.ENGINE, i // spec.engine_tp, i % spec.engine_tp))
    for role in spec.roles:  # rank r of a role on the r-th of its bundles
        for rank, slot in enumerate(spec.role_bundles(role)):
            tenants[slot].append(Tenant(TenantKind.ROLE, rank, role=role.name))
    bundles = tuple(
        BundleSlot(
            index=b,
            node=b // gpn,
            local_gpu=b % gpn,
            tenants=tuple(ts),
            cpus=spec.cpus_per_bundle,
        )
        for b, ts in enumerate(tenants)
    )
    return Plan(spec=spec, bundles=bundles)
