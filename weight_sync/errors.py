"""The errors weight_sync raises."""

from __future__ import annotations

__all__ = ["WeightSyncError", "VerificationError", "BucketPlanError", "PackingError"]


class WeightSyncError(RuntimeError):
    """A weight transfer failed, timed out, or arrived different from what was sent.

    A transport failure (store, gloo, NCCL) names who was on the other side and, once
    streaming, which bucket; the store's or backend's own error is its ``__cause__``.

    Attributes:
        peer: The other side (e.g. ``"sender (rank 0) of the gloo group at 127.0.0.1:4711"``),
            or None where no peer is involved.
        bucket: The bucket index being moved, or None outside the stream.
    """

    def __init__(self, message: str, *, peer: str | None = None, bucket: int | None = None):
        super().__init__(message)
        self.peer = peer
        self.bucket = bucket


class VerificationError(WeightSyncError):
    """What arrived (or was applied) differs from what was sent; names the tensor and where."""


class BucketPlanError(ValueError):
    """A bucket layout that would corrupt the engine (a split fused group) or is ill-formed."""


class PackingError(ValueError):
    """An engine model whose packing (fused parameters) the sync cannot map.

    The message names the model, the first parameter left unexplained and the fix; raised
    before any weight is sent.
    """
