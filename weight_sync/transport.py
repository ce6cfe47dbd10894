"""The transport interface and its rendezvous description (implementations: one file each).

A transport moves one bucket (a flat byte buffer) from a trainer rank to engine workers. Every
operation is asynchronous and returns a handle whose ``wait()`` is bounded by the rendezvous
timeout, so that at most two buckets are in flight per side (double buffering) and a dead peer
becomes an error instead of a hang.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from weight_sync.buckets import Bucket
from weight_sync.errors import WeightSyncError

__all__ = [
    "Backend",
    "Rendezvous",
    "Pending",
    "SenderTransport",
    "ReceiverTransport",
    "transport_error",
]


class Backend(enum.Enum):
    """How bytes travel from a trainer rank to an engine worker."""

    GLOO = "gloo"  # torch.distributed over TCP, CPU tensors
    NCCL = "nccl"  # torch.distributed over NCCL, sender and receiver on different GPUs
    CUDA_IPC = "cuda_ipc"  # shared CUDA buffers, sender and receiver on one GPU


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the members of one transfer group meet.

    Attributes:
        host: Address of the store, hosted by the sender. Loopback on a single node, so that
            nothing listens on a routable interface unless the topology needs it.
        port: The store's port (chosen free by the sender's OS).
        world_size: Members: the sender (rank 0) plus the receivers.
        key: Per-run prefix of every store key, so two jobs on one node never cross.
        timeout_s: Bound on every store wait and every collective.
        backend: The transport.
    """

    host: str
    port: int
    world_size: int
    key: str
    timeout_s: float
    backend: Backend

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"Rendezvous.port={self.port!r}: must be in 1..65535")
        if not isinstance(self.world_size, int) or self.world_size < 2:
            raise ValueError(
                f"Rendezvous.world_size={self.world_size!r}: needs the sender and at least one "
                "receiver (>= 2)"
            )
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s)) or (
            self.timeout_s <= 0
        ):
            raise ValueError(f"Rendezvous.timeout_s={self.timeout_s!r}: must be finite and > 0")
        if not self.key:
            raise ValueError("Rendezvous.key is empty; pass a per-run key (e.g. a uuid)")

    def peers_of(self, rank: int) -> str:
        """Who member ``rank`` exchanges with, for errors: the receivers, or the sender."""
        group = f"the {self.backend.value} group at {self.host}:{self.port}"
        if rank == 0:
            return f"receivers (ranks 1-{self.world_size - 1}) of {group}"
        return f"sender (rank 0) of {group}"


def transport_error(
    what: str,
    exc: BaseException,
    peer: str,
    bucket: int | None = None,
    bound_s: float | None = None,
) -> WeightSyncError:
    """``exc`` (a store, gloo or NCCL error) as a :class:`WeightSyncError` naming ``peer``.

    A ``WeightSyncError`` already is one and comes back unchanged.

    Args:
        what: The operation (``"receive"``, ``"joining the group as rank 1"``).
        exc: The store's or backend's error (kept as the cause).
        peer: Who is on the other side (:meth:`Rendezvous.peers_of`).
        bucket: The bucket being moved, if any.
        bound_s: The timeout the operation ran under, if any.
    """
    if isinstance(exc, WeightSyncError):
        return exc
    where = "" if bucket is None else f" of bucket {bucket}"
    bound = "" if bound_s is None else f" (bound {bound_s:g} s)"
    return WeightSyncError(
        f"{what}{where} with the {peer} failed{bound}: {type(exc).__name__}: {exc}",
        peer=peer,
        bucket=bucket,
    )


class Pending(ABC):
    """An operation in flight."""

    @abstractmethod
    def wait(self) -> torch.Tensor:
        """Blocks (bounded by the timeout) until done; returns the buffer it concerns."""


class SenderTransport(ABC):
    """Sending side of a transport.

    Implementations set ``messages`` (a store every member of the group reaches),
    ``timeout_s`` and ``peer`` (who is on the other side, for errors); small messages (a sync's
    manifest of fingerprints) travel through the store.
    """

    messages = None
    timeout_s: float = 60.0
    peer: str = "receivers"

    def publish(self, key: str, payload: bytes) -> None:
        """Posts a small message every receiver of the group can :meth:`fetch`.

        Raises:
            WeightSyncError: The store failed (names the peers).
        """
        try:
            self.messages.set(f"msg/{key}", payload)
        except Exception as exc:  # noqa: BLE001 - the store raises RuntimeError/DistStoreError
            raise transport_error(f"posting message {key!r}", exc, self.peer) from exc

    @abstractmethod
    def send(self, bucket: Bucket, buffer: torch.Tensor) -> Pending:
        """Starts sending ``buffer[:bucket.nbytes]``; ``wait()`` returns when it may be reused."""

    @abstractmethod
    def close(self) -> None:
        """Releases the group. Idempotent."""


class ReceiverTransport(ABC):
    """Receiving side of a transport (``messages``, ``timeout_s``, ``peer`` as for the sender)."""

    messages = None
    timeout_s: float = 60.0
    peer: str = "sender"

    def fetch(self, key: str) -> bytes:
        """The message the sender posted under ``key`` (bounded wait)."""
        from weight_sync.store import wait_get

        return wait_get(
            self.messages, f"msg/{key}", self.timeout_s, f"message {key!r}", peer=self.peer
        )

    @abstractmethod
    def receive(self, bucket: Bucket) -> Pending:
        """Starts receiving ``bucket``; ``wait()`` returns a buffer holding its bytes."""

    @abstractmethod
    def done(self, bucket: Bucket) -> None:
        """Tells the sender that ``bucket`` was applied (its buffer may be reused)."""

    @abstractmethod
    def close(self) -> None:
        """Releases the group. Idempotent."""
