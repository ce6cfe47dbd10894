"""The errors weight_sync raises."""

from __future__ import annotations

__all__ = ["WeightSyncError", "BucketPlanError"]


class WeightSyncError(RuntimeError):
    """A weight transfer failed, timed out, or arrived different from what was sent."""


class BucketPlanError(ValueError):
    """A bucket layout that would corrupt the engine (a split fused group) or is ill-formed."""
