"""From a topology description to ordered Ray placement-group bundles.

``TopologySpec`` and ``plan`` are pure (no Ray); ``reserve`` is the thin Ray layer on top.
"""

from placement.plan import BundleSlot, Plan, Tenant, TenantKind, plan
from placement.reserve import (
    BundleLocation,
    EngineLaunch,
    PlacementTimeoutError,
    Reservation,
    discover_cluster,
    reserve,
)
from placement.spec import ClusterInfo, NodeInfo, TopologyError, TopologySpec

__all__ = [
    "BundleLocation",
    "BundleSlot",
    "ClusterInfo",
    "EngineLaunch",
    "NodeInfo",
    "PlacementTimeoutError",
    "Plan",
    "Reservation",
    "Tenant",
    "TenantKind",
    "TopologyError",
    "TopologySpec",
    "discover_cluster",
    "plan",
    "reserve",
]
