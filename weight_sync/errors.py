"""The errors weight_sync raises."""

from __future__ import annotations

__all__ = ["WeightSyncError", "VerificationError", "BucketPlanError", "PackingError"]


class WeightSyncError(RuntimeError):
    """A weight transfer failed, timed out, or arrived different from what was sent."""


class VerificationError(WeightSyncError):
    """What arrived (or was applied) differs from what was sent; names the tensor and where."""


class BucketPlanError(ValueError):
    """A bucket layout that would corrupt the engine (a split fused group) or is ill-formed."""


class PackingError(ValueError):
    """An engine model whose packing (fused parameters) the sync cannot map.

    The message names the model, the first parameter left unexplained and the fix; raised
    before any weight is sent.
    """
