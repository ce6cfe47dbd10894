"""The user's description of a topology, validated before anything touches Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TopologyError", "TopologySpec", "RoleSpec", "ClusterInfo", "NodeInfo"]

#: Names a role may not take: the built-in tenants' own and the coordinator's lane.
RESERVED_NAMES = frozenset({"engine", "trainer", "coordinator", "role"})


class TopologyError(ValueError):
    """An ill-formed or infeasible topology; the message names the field, the value and the fix."""


def _field_error(field: str, value: object, problem: str, fix: str) -> TopologyError:
    return TopologyError(f"TopologySpec.{field}={value!r}: {problem}; fix: {fix}")


def _require_count(field: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(field, value, "must be an int", f"pass an integer >= {minimum}")
    if value < minimum:
        raise _field_error(field, value, f"must be >= {minimum}", f"pass an integer >= {minimum}")


def _require_fraction(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(field, value, "must be a number", "pass a float in (0, 1]")
    if not math.isfinite(value):
        raise _field_error(field, value, "is not finite", "pass a float in (0, 1]")
    if not 0 < value <= 1:
        raise _field_error(field, value, "is outside (0, 1]", "pass a float in (0, 1]")


@dataclass(frozen=True)
class RoleSpec:
    """Where one extra tenant (a reference policy, reward model, critic or a user's actor) sits.

    Attributes:
        name: Lower-case letters and ``_`` (its actors are named ``<name><rank>``).
        bundles: The GPUs (bundle indices) it takes, one rank on each; None: one rank on each
            of the trainer's bundles.
        gpu_fraction: Ray ``num_gpus`` of each of its actors (a share of its GPU).
    """

    name: str
    bundles: tuple[int, ...] | None = None
    gpu_fraction: float = 0.1

    def __post_init__(self) -> None:
        name = self.name
        if not (isinstance(name, str) and name and all(c.islower() or c == "_" for c in name)):
            raise TopologyError(
                f"RoleSpec.name={name!r}: must be lower-case letters or '_' (its actors are "
                "named <name><rank>); fix: e.g. name='reference'"
            )
        if name in RESERVED_NAMES:
            raise TopologyError(
                f"RoleSpec.name={name!r} is reserved for a built-in tenant; fix: use another "
                f"name (not one of {sorted(RESERVED_NAMES)})"
            )
        if self.bundles is not None:
            b = self.bundles
            if (
                not isinstance(b, tuple)
                or not b
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in b)
                or len(set(b)) != len(b)
            ):
                raise TopologyError(
                    f"RoleSpec({name!r}).bundles={b!r}: must be a non-empty tuple of distinct "
                    "bundle indices >= 0, or None (the trainer's bundles); fix: e.g. (0, 1)"
                )
        f = self.gpu_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f < 1):
            raise TopologyError(
                f"RoleSpec({name!r}).gpu_fraction={f!r}: must be a number in (0, 1); fix: "
                "pass e.g. 0.1"
            )


@dataclass(frozen=True)
class TopologySpec:
    """Which GPUs the trainer ranks and the vLLM engines use.

    Colocation rule (``colocate=True``): every GPU of the cluster holds exactly one trainer rank
    and one engine TP worker, so ``trainer_world_size == nodes * gpus_per_node == engines *
    engine_tp``. Separate pools (``colocate=False``): trainer ranks take the first GPUs in
    node-major order and engines the rest, so ``trainer_world_size + engines * engine_tp ==
    nodes * gpus_per_node``; every GPU holds one tenant.

    Attributes:
        nodes: Number of nodes.
        gpus_per_node: GPUs used on each node.
        trainer_world_size: Trainer (DeepSpeed) ranks, one per GPU.
        engines: Number of vLLM engines.
        engine_tp: Tensor-parallel size of each engine; its ranks always stay on one node.
        colocate: Share every GPU between a trainer rank and an engine worker.
        trainer_gpu_fraction: Ray ``num_gpus`` of a trainer actor. Default: what the engine
            leaves of a shared GPU (0.5 when both are unset), 1.0 with separate pools.
        engine_gpu_fraction: Ray ``num_gpus`` of an engine worker; default as above.
        cpus_per_bundle: Ray CPUs reserved with each GPU bundle (fractional allowed: on small
            machines whole CPUs per bundle keep placement groups from ever becoming ready).
        roles: Extra tenants (:class:`RoleSpec`), placed beside the trainer ranks by default.
            With roles, an unset trainer or engine fraction is derived from what the roles
            leave of the most loaded GPU; on every GPU the fractions of its tenants sum to at
            most 1.
    """

    nodes: int
    gpus_per_node: int
    trainer_world_size: int
    engines: int
    engine_tp: int = 1
    colocate: bool = True
    trainer_gpu_fraction: float | None = None
    engine_gpu_fraction: float | None = None
    cpus_per_bundle: float = 0.2
    roles: tuple[RoleSpec, ...] = ()

    def __post_init__(self) -> None:
        _require_count("nodes", self.nodes)
        _require_count("gpus_per_node", self.gpus_per_node)
        _require_count("trainer_world_size", self.trainer_world_size)
        _require_count("engines", self.engines)
        _require_count("engine_tp", self.engine_tp)
        if not isinstance(self.colocate, bool):
            raise _field_error("colocate", self.colocate, "must be a bool", "pass True or False")
        if self.engine_tp > self.gpus_per_node:
            raise _field_error(
                "engine_tp",
                self.engine_tp,
                f"is larger than gpus_per_node={self.gpus_per_node}; an engine's TP ranks must "
                "stay on one node",
                f"use engine_tp <= {self.gpus_per_node}",
            )
        if self.gpus_per_node % self.engine_tp:
            raise _field_error(
                "engine_tp",
                self.engine_tp,
                f"does not divide gpus_per_node={self.gpus_per_node}, so some engine would span "
                "two nodes",
                f"use a divisor of {self.gpus_per_node}",
            )
        cpus = self.cpus_per_bundle
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not math.isfinite(cpus):
            raise _field_error("cpus_per_bundle", cpus, "must be a finite number", "pass e.g. 0.2")
        if cpus <= 0:
            raise _field_error("cpus_per_bundle", cpus, "must be > 0", "pass e.g. 0.2")
        for name in ("trainer_gpu_fraction", "engine_gpu_fraction"):
            value = getattr(self, name)
            if value is not None:
                _require_fraction(name, value)
        self._check_gpu_counts()
        if self.colocate:
            for name in ("trainer_gpu_fraction", "engine_gpu_fraction"):
                if getattr(self, name) == 1:
                    raise _field_error(
                        name,
                        getattr(self, name),
                        "leaves nothing of the shared GPU for the other tenant",
                        "use a fraction below 1 when colocate=True",
                    )
            total = self.trainer_fraction + self.engine_fraction
            if total > 1 + 1e-9 and not self.roles:
                raise TopologyError(
                    f"TopologySpec.trainer_gpu_fraction={self.trainer_gpu_fraction!r} + "
                    f"engine_gpu_fraction={self.engine_gpu_fraction!r} = {total:g} > 1 on each "
                    "shared GPU; fix: make the two fractions sum to at most 1 (or set only one "
                    "and the other is derived)"
                )

        self._check_roles()

    def _check_roles(self) -> None:
        if not isinstance(self.roles, tuple) or not all(
            isinstance(r, RoleSpec) for r in self.roles
        ):
            raise _field_error(
                "roles", self.roles, "must be a tuple of RoleSpec", "pass (RoleSpec(...), ...)"
            )
        names = [r.name for r in self.roles]
        if len(set(names)) != len(names):
            raise _field_error("roles", names, "has a name twice", "give every role its own name")
        for r in self.roles:
            bad = [b for b in self.role_bundles(r) if b >= self.total_gpus]
            if bad:
                raise TopologyError(
                    f"RoleSpec({r.name!r}).bundles={r.bundles!r}: bundle {bad[0]} does not "
                    f"exist (the topology has {self.total_gpus}: nodes={self.nodes} x "
                    f"gpus_per_node={self.gpus_per_node}); fix: use bundles in "
                    f"0..{self.total_gpus - 1}"
                )
        for name, value in (("trainer", self.trainer_fraction), ("engine", self.engine_fraction)):
            if value <= 1e-9:
                raise _field_error(
                    "roles",
                    names,
                    f"leave the {name} no share of its GPU (the roles take {self.role_load:g})",
                    "lower RoleSpec.gpu_fraction",
                )
        for bundle in range(self.total_gpus):
            parts = self.fractions_on(bundle)
            total = sum(f for _, f in parts)
            if total > 1 + 1e-9:
                listed = " + ".join(f"{who} {f:g}" for who, f in parts)
                raise TopologyError(
                    f"GPU (bundle) {bundle}: the tenants' fractions {listed} = {total:g} > 1; "
                    "fix: lower RoleSpec.gpu_fraction, trainer_gpu_fraction or "
                    "engine_gpu_fraction, or put the role on other bundles"
                )

    def role_bundles(self, role: RoleSpec) -> tuple[int, ...]:
        """The bundles ``role`` takes: its own, or the trainer's (rank ``r`` on bundle ``r``)."""
        return role.bundles if role.bundles is not None else tuple(range(self.trainer_world_size))

    def fractions_on(self, bundle: int) -> list[tuple[str, float]]:
        """Every tenant's GPU share on ``bundle`` as (who, fraction), trainer and engine first."""
        parts = []
        if bundle < self.trainer_world_size:
            parts.append(("trainer", self.trainer_fraction))
        if self.colocate or bundle >= self.trainer_world_size:
            parts.append(("engine", self.engine_fraction))
        parts += [(r.name, r.gpu_fraction) for r in self.roles if bundle in self.role_bundles(r)]
        return parts

    @property
    def role_load(self) -> float:
        """The largest sum of role fractions on one GPU (0 without roles)."""
        loads = [
            sum(r.gpu_fraction for r in self.roles if b in self.role_bundles(r))
            for b in range(self.total_gpus)
        ]
        return max(loads, default=0.0)

    def _check_gpu_counts(self) -> None:
        total = self.total_gpus
        engine_gpus = self.engines * self.engine_tp
        if self.colocate:
            if self.trainer_world_size != total:
                raise _field_error(
                    "trainer_world_size",
                    self.trainer_world_size,
                    f"colocated topologies put one trainer rank on each of the {total} GPUs "
                    f"(nodes={self.nodes} x gpus_per_node={self.gpus_per_node})",
                    f"set trainer_world_size={total}, or use colocate=False",
                )
            if engine_gpus != total:
                raise _field_error(
                    "engines",
                    self.engines,
                    f"engines x engine_tp = {engine_gpus} but colocated topologies put one engine "
                    f"worker on each of the {total} GPUs",
                    f"set engines={total // self.engine_tp} for engine_tp={self.engine_tp}",
                )
        elif self.trainer_world_size + engine_gpus != total:
            raise _field_error(
                "trainer_world_size",
                self.trainer_world_size,
                f"separate pools need trainer_world_size + engines x engine_tp "
                f"({self.trainer_world_size} + {engine_gpus}) == nodes x gpus_per_node ({total})",
                f"set trainer_world_size={total - engine_gpus} or change engines/engine_tp",
            )

    @property
    def total_gpus(self) -> int:
        """GPUs (and bundles) in the topology."""
        return self.nodes * self.gpus_per_node

    @property
    def tenants_per_gpu(self) -> int:
        """The most actors sharing one GPU: 2 when colocated, else 1, plus the roles there."""
        base = 2 if self.colocate else 1
        roles = [sum(b in self.role_bundles(r) for r in self.roles) for b in range(self.total_gpus)]
        return base + max(roles, default=0)

    @property
    def trainer_fraction(self) -> float:
        """Effective Ray ``num_gpus`` of a trainer actor."""
        return self._fraction(self.trainer_gpu_fraction, self.engine_gpu_fraction)

    @property
    def engine_fraction(self) -> float:
        """Effective Ray ``num_gpus`` of an engine worker."""
        return self._fraction(self.engine_gpu_fraction, self.trainer_gpu_fraction)

    def _fraction(self, own: float | None, other: float | None) -> float:
        # Unset fractions are derived so that the tenants of one GPU sum to exactly 1.
        # Roles take their share of the most loaded GPU first.
        if own is not None:
            return float(own)
        free = 1.0 - self.role_load
        if not self.colocate:
            return free
        return free - float(other) if other is not None else free / 2

    @property
    def actor_cpus(self) -> float:
        """Ray ``num_cpus`` of each actor: the bundle's CPUs split between its tenants."""
        return self.cpus_per_bundle / self.tenants_per_gpu


@dataclass(frozen=True)
class NodeInfo:
    """One alive node of a running cluster, as discovered from Ray."""

    node_id: str
    address: str
    gpus: float
    cpus: float


@dataclass(frozen=True)
class ClusterInfo:
    """What a running cluster offers; passed to :func:`placement.plan` to check feasibility."""

    nodes: tuple[NodeInfo, ...]

    def check(self, spec: TopologySpec) -> None:
        """Raises :class:`TopologyError` if ``spec`` cannot fit on this cluster."""
        per_node_cpus = spec.cpus_per_bundle * spec.gpus_per_node
        fit = [n for n in self.nodes if n.gpus >= spec.gpus_per_node]
        if len(fit) < spec.nodes:
            raise _field_error(
                "nodes",
                spec.nodes,
                f"the cluster has only {len(fit)} node(s) with >= {spec.gpus_per_node} GPUs "
                f"(nodes: {self._describe()})",
                f"use nodes <= {len(fit)}, fewer gpus_per_node, or add nodes",
            )
        fit = [n for n in fit if n.cpus + 1e-9 >= per_node_cpus]
        if len(fit) < spec.nodes:
            raise _field_error(
                "cpus_per_bundle",
                spec.cpus_per_bundle,
                f"{spec.gpus_per_node} bundles per node need {per_node_cpus:g} CPUs per node, "
                f"but only {len(fit)} node(s) have that many (nodes: {self._describe()})",
                "use a smaller (fractional) cpus_per_bundle",
            )

    def _describe(self) -> str:
        return ", ".join(f"{n.address} {n.gpus:g} GPU/{n.cpus:g} CPU" for n in self.nodes) or "none"
