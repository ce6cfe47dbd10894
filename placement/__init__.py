"""From a topology description to ordered Ray placement-group bundles.

``TopologySpec`` and ``plan`` are pure (no Ray); ``reserve`` is the thin Ray layer on top. The
Ray layer is imported on first use, so the planner (and code that only plans, such as the
CUDA device checks) works where Ray is not installed.
"""

import importlib

from placement.hardware import Accelerator, DeviceKind, device_kind_of
from placement.plan import BundleSlot, Plan, Tenant, TenantKind, plan
from placement.spec import ClusterInfo, NodeInfo, RoleSpec, TopologyError, TopologySpec

_RAY_LAYER = {
    "BundleLocation",
    "EngineLaunch",
    "PlacementTimeoutError",
    "Reservation",
    "discover_cluster",
    "probe_bundle",
    "reserve",
}

__all__ = [
    "Accelerator",
    "BundleLocation",
    "BundleSlot",
    "ClusterInfo",
    "DeviceKind",
    "EngineLaunch",
    "NodeInfo",
    "PlacementTimeoutError",
    "Plan",
    "Reservation",
    "RoleSpec",
    "Tenant",
    "TenantKind",
    "TopologyError",
    "TopologySpec",
    "device_kind_of",
    "discover_cluster",
    "plan",
    "probe_bundle",
    "reserve",
]


def __getattr__(name: str):
    if name in _RAY_LAYER:
        return getattr(importlib.import_module("placement.reservation"), name)
    raise AttributeError(f"module 'placement' has no attribute {name!r}")
