"""The errors weight_sync raises."""

from __future__ import annotations

__all__ = ["WeightSyncError", "VerificationError", "BucketPlanError"]


class WeightSyncError(RuntimeError):
    """A weight transfer failed, timed out, or arrived different from what was sent."""


class VerificationError(WeightSyncError):
    """What arrived (or was applied) differs from what was sent; names the tensor and where."""


class BucketPlanError(ValueError):
    """A bucket layout that would corrupt the engine (a split fused group) or is ill-formed."""
