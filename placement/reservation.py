"""The thin Ray layer over a plan: reserve placement groups, order bundles, hand out options.

One placement group per planned node, each ``STRICT_PACK``: a node's bundles (and so every
engine's TP ranks) can never be split across machines. Ray's bundle order says nothing about
GPU ids, and the order of nodes is not stable, so after reservation a tiny probe task runs on
every bundle, and bundles are ordered by (node address, node id, GPU id). The same probe reads
each bundle's accelerator on its own node (``placement.hardware``): the reservation, not the
driver, says whether the pipeline runs on CUDA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from placement.hardware import Accelerator, DeviceKind, device_kind_of, probe_accelerator
from placement.plan import Plan
from placement.spec import ClusterInfo, NodeInfo, TopologyError

__all__ = [
    "PlacementTimeoutError",
    "BundleLocation",
    "EngineLaunch",
    "Reservation",
    "discover_cluster",
    "probe_bundle",
    "reserve",
]

# Probe tasks take a sliver of the bundle so they fit beside nothing else yet scheduled.
_PROBE_SHARE = 0.01


class PlacementTimeoutError(TimeoutError):
    """The placement groups did not become ready in time; they have been removed."""


@dataclass(frozen=True)
class BundleLocation:
    """Where a planned bundle landed: placement group, index there, node, GPU id, accelerator."""

    placement_group: PlacementGroup
    index_in_group: int
    node_id: str
    node_address: str
    gpu_id: str
    accelerator: Accelerator


@dataclass(frozen=True)
class EngineLaunch:
    """How to start engine ``engine``: Ray options for its actor, and vLLM executor settings.

    Attributes:
        actor_options: Keyword arguments for ``EngineActor.options(...)``.
        bundle_indices: Index within the node's placement group of each TP rank's bundle.
        per_worker_gpus: GPU share of each vLLM worker.
        placement_group: The node's placement group (all TP ranks are in it).
        executor_env: Environment the engine actor sets for vLLM's Ray executor before it
            builds the engine (only for TP > 1 on CUDA). Passed to the actor explicitly instead of
            being set in the driver, so two engines never see each other's settings.
    """

    actor_options: dict[str, Any]
    bundle_indices: tuple[int, ...]
    per_worker_gpus: float
    placement_group: PlacementGroup
    executor_env: dict[str, str] = field(default_factory=dict)


def discover_cluster() -> ClusterInfo:
    """Reads the alive nodes of the connected Ray cluster and their GPU/CPU totals."""
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        nodes.append(
            NodeInfo(
                node_id=n["NodeID"],
                address=n.get("NodeManagerAddress", "?"),
                gpus=float(res.get("GPU", 0.0)),
                cpus=float(res.get("CPU", 0.0)),
            )
        )
    nodes.sort(key=lambda n: (n.address, n.node_id))
    return ClusterInfo(nodes=tuple(nodes))


# max_calls=0: Ray otherwise ends a GPU task's worker after one call, so every probe would
# start a fresh Python process (tens of seconds for 64 bundles: docs/design.md, section 8a).
@ray.remote(num_cpus=_PROBE_SHARE, num_gpus=_PROBE_SHARE, max_calls=0)
def probe_bundle() -> tuple[str, str, str, Accelerator]:
    """Runs on a bundle: its node id, node address, GPU id and accelerator (read right there).

    ``reserve(probe=...)`` takes a replacement with the same answer shape (e.g. to simulate
    CUDA bundles on a CPU machine in tests).
    """
    ctx = ray.get_runtime_context()
    gpus = ray.get_gpu_ids()
    gpu = str(gpus[0]) if gpus else "?"
    address = ray.util.get_node_ip_address()
    return ctx.get_node_id(), address, gpu, probe_accelerator(gpu, address)


class Reservation:
    """Reserved placement groups for a plan, with bundles in (node, GPU id) order.

    Use as a context manager, or call :meth:`release`; the groups are removed either way.
    """

    def __init__(
        self,
        plan: Plan,
        groups: list[PlacementGroup],
        locations: list[BundleLocation],
        timings: dict[str, float] | None = None,
    ):
        self.plan = plan
        #: Seconds of each step of :func:`reserve`: ``check_s``, ``ready_s``, ``probe_s``.
        self.timings: dict[str, float] = dict(timings or {})
        self._groups = groups
        self._locations = locations
        self._released = False
        self.device: DeviceKind = device_kind_of([loc.accelerator for loc in locations])

    @property
    def accelerators(self) -> tuple[Accelerator, ...]:
        """Each planned bundle's accelerator, by bundle index (as its node reported it)."""
        return tuple(loc.accelerator for loc in self._locations)

    def hardware(self) -> dict:
        """The device facts of the reservation as plain data (for summaries and logs)."""
        return {
            "device": self.device.value,
            "source": "placement probe on each bundle",
            "bundles": [
                {
                    "bundle": i,
                    "node_id": loc.node_id,
                    "node_address": loc.node_address,
                    "gpu_id": loc.gpu_id,
                    "name": loc.accelerator.name,
                    "memory_bytes": loc.accelerator.memory_bytes,
                    "memory_kind": loc.accelerator.memory_kind,
                }
                for i, loc in enumerate(self._locations)
            ],
        }

    def location(self, bundle: int) -> BundleLocation:
        """Where planned bundle ``bundle`` landed."""
        self.plan.node_of(bundle)  # validates the index
        return self._locations[bundle]

    def trainer_options(self, rank: int) -> dict[str, Any]:
        """Ray actor options for trainer rank ``rank``: its bundle, GPU share and CPUs."""
        return self._options(self.plan.trainer_bundle(rank), self.plan.spec.trainer_fraction)

    def role_options(self, role: str, rank: int) -> dict[str, Any]:
        """Ray actor options for rank ``rank`` of role ``role``: its bundle, share and CPUs."""
        return self._options(self.plan.role_bundles(role)[rank], self.plan.role_fraction(role))

    def engine_launch(self, engine: int) -> EngineLaunch:
        """How to start engine ``engine``.

        TP 1, or any TP off CUDA (vLLM's CPU build runs its TP workers as local processes):
        the actor takes the engine's GPU share on its first TP rank's bundle. TP > 1 on CUDA: the
        actor takes no GPU itself; vLLM's Ray executor starts one worker per TP rank on the
        bundles named in ``executor_env``, each with ``per_worker_gpus``.
        """
        bundles = self.plan.engine_bundles(engine)
        locs = [self._locations[b] for b in bundles]
        pg = locs[0].placement_group
        fraction = self.plan.spec.engine_fraction
        indices = tuple(loc.index_in_group for loc in locs)
        if self.device is DeviceKind.CUDA and len(bundles) > 1:
            options = self._options(bundles[0], 0.0)
            env = {
                "VLLM_RAY_PER_WORKER_GPUS": repr(fraction),
                "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, indices)),
            }
        else:
            options, env = self._options(bundles[0], fraction), {}
        return EngineLaunch(options, indices, fraction, pg, env)

    def _options(self, bundle: int, gpus: float) -> dict[str, Any]:
        loc = self._locations[bundle]
        return {
            "num_gpus": gpus,
            "num_cpus": self.plan.spec.actor_cpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=loc.placement_group,
                placement_group_bundle_index=loc.index_in_group,
                placement_group_capture_child_tasks=True,
            ),
        }

    @property
    def placement_groups(self) -> tuple[PlacementGroup, ...]:
        """The reserved groups, in node order."""
        return tuple(self._groups)

    def release(self) -> None:
        """Removes the placement groups. Idempotent."""
        if self._released:
            return
        self._released = True
        for pg in self._groups:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - a group already gone (e.g. Ray shut down) is fine
                pass

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_available() -> str:
    parts = []
    for n in ray.nodes():
        if n.get("Alive"):
            res = n.get("Resources", {})
            parts.append(
                f"{n.get('NodeManagerAddress')}: GPU {res.get('GPU', 0):g}, "
                f"CPU {res.get('CPU', 0):g}"
            )
    avail = ray.available_resources()
    return (
        f"cluster totals by node [{'; '.join(parts)}]; available now: GPU "
        f"{avail.get('GPU', 0):g}, CPU {avail.get('CPU', 0):g}"
    )


def reserve(
    plan: Plan,
    *,
    timeout_s: float = 60.0,
    check_cluster: bool = True,
    name: str | None = None,
    probe=None,
) -> Reservation:
    """Reserves the plan's bundles and returns them ordered by (node, GPU id).

    Order of steps: (1) optionally check the spec against the discovered cluster (raises
    :class:`TopologyError` before anything is reserved); (2) create one ``STRICT_PACK``
    placement group per planned node; (3) wait for all of them, at most ``timeout_s``; on
    timeout remove them and raise; (4) probe each bundle's node, GPU id and accelerator; (5)
    order; (6) check that every bundle has the same kind of device.

    Args:
        plan: The plan to reserve.
        timeout_s: Bound on waiting for the groups to be ready.
        check_cluster: Check feasibility against the live cluster first. Turn off on an
            autoscaling cluster that adds nodes on demand.
        name: Optional name prefix of the groups (shown by ``ray list placement-groups``).
        probe: The remote function run on each bundle (default :func:`probe_bundle`).

    Raises:
        TopologyError: The cluster cannot hold the plan, or its bundles mix device kinds
            (nothing stays reserved).
        PlacementTimeoutError: Not ready within ``timeout_s`` (says what was asked and what
            is available); nothing stays reserved.
    """
    if timeout_s <= 0:
        raise TopologyError(f"reserve timeout_s={timeout_s!r}: must be > 0; fix: pass e.g. 60")
    t0 = time.perf_counter()
    if check_cluster:
        discover_cluster().check(plan.spec)
    timings = {"check_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    spec = plan.spec
    bundles = [dict(b.resources) for b in plan.bundles[: spec.gpus_per_node]]
    groups = [
        placement_group(bundles, strategy="STRICT_PACK", name=f"{name}-node{n}" if name else "")
        for n in range(spec.nodes)
    ]
    ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=timeout_s)
    timings["ready_s"] = time.perf_counter() - t0
    if len(ready) < len(groups):
        detail = _describe_available()
        for pg in groups:
            remove_placement_group(pg)
        raise PlacementTimeoutError(
            f"placement not ready after {timeout_s:g} s: asked for {spec.nodes} node(s) x "
            f"{spec.gpus_per_node} bundle(s) of {bundles[0]} each (STRICT_PACK per node), "
            f"{len(ready)} of {len(groups)} node groups ready; {detail}. Fix: free resources, "
            "add nodes, or lower cpus_per_bundle / gpus_per_node"
        )
    try:
        t0 = time.perf_counter()
        located = _locate(groups, spec.gpus_per_node, timeout_s, probe or probe_bundle)
        timings["probe_s"] = time.perf_counter() - t0
        return Reservation(
            plan, [g for g, _ in located], [loc for _, locs in located for loc in locs], timings
        )
    except Exception:
        for pg in groups:
            remove_placement_group(pg)
        raise


def _locate(
    groups: list[PlacementGroup], per_group: int, timeout_s: float, probe
) -> list[tuple[PlacementGroup, list[BundleLocation]]]:
    # Bundle i of every group is probed together, then bundle i + 1: each node keeps reusing
    # one probe worker instead of starting one per bundle.
    deadline = time.monotonic() + timeout_s
    probes: list[list] = [[] for _ in groups]
    for i in range(per_group):
        refs = [
            probe.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i
                )
            ).remote()
            for pg in groups
        ]
        for g, result in enumerate(ray.get(refs, timeout=max(1.0, deadline - time.monotonic()))):
            probes[g].append(result)
    located = []
    for pg, results in zip(groups, probes, strict=True):
        locs = [
            BundleLocation(pg, i, node_id, address, gpu, accelerator)
            for i, (node_id, address, gpu, accelerator) in enumerate(results)
        ]
        locs.sort(key=lambda loc: _gpu_sort_key(loc.gpu_id))
        located.append((pg, locs))
    # Two groups may share a node (one with more GPUs than gpus_per_node): GPU id breaks the tie.
    located.sort(
        key=lambda item: (
            item[1][0].node_address,
            item[1][0].node_id,
            _gpu_sort_key(item[1][0].gpu_id),
        )
    )
    return located


def _gpu_sort_key(gpu_id: str) -> tuple[int, int | str]:
    return (0, int(gpu_id)) if gpu_id.isdigit() else (1, gpu_id)
