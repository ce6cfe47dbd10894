"""Collective transport: a torch.distributed group with its own store (gloo on CPU, NCCL on CUDA).

The group is built directly from a store (``ProcessGroupGloo`` / ``ProcessGroupNCCL``), never
through ``init_process_group``, so it neither touches nor clashes with the default group that
DeepSpeed (or vLLM) created in the same process. Rank 0 is the sender; each bucket is one
broadcast from it into the receivers' own, reused buffers.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
from typing_extensions import override

from weight_sync.buckets import Bucket
from weight_sync.errors import WeightSyncError
from weight_sync.transport import (
    Backend,
    Pending,
    ReceiverTransport,
    Rendezvous,
    SenderTransport,
    transport_error,
)

__all__ = ["CollectiveSender", "CollectiveReceiver", "new_group"]


def new_group(rdv: Rendezvous, store, rank: int, device: torch.device):
    """Creates this member's process group over ``store`` (already under the per-run prefix).

    Raises:
        WeightSyncError: The group did not form (a member missing, the store gone); names the
            peers and the group's address.
    """
    try:
        return _new_group(rdv, store, rank, device)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
        raise transport_error(
            f"joining the group as rank {rank}", exc, rdv.peers_of(rank), bound_s=rdv.timeout_s
        ) from exc


def _new_group(rdv: Rendezvous, store, rank: int, device: torch.device):
    timeout = datetime.timedelta(seconds=rdv.timeout_s)
    group_store = dist.PrefixStore("collective/", store)
    if rdv.backend is Backend.GLOO:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # Gloo listens on the rendezvous host only (loopback on a single node).
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_local_host(rdv))]
        return dist.ProcessGroupGloo(group_store, rank, rdv.world_size, opts)
    if rdv.backend is Backend.NCCL:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        torch.cuda.set_device(device)
        return dist.ProcessGroupNCCL(group_store, rank, rdv.world_size, opts)
    raise ValueError(f"collective transport cannot run backend {rdv.backend}")


def _local_host(rdv: Rendezvous) -> str:
    """This process's address on the route to the store (no Ray needed: TP workers lack it)."""
    if rdv.host.startswith("127.") or rdv.host in ("localhost", "::1"):
        return rdv.host
    family = socket.AF_INET6 if ":" in rdv.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((rdv.host, rdv.port))  # UDP connect sends nothing; it only routes
        return probe.getsockname()[0]


class _Work(Pending):
    def __init__(self, work, buffer: torch.Tensor, rdv: Rendezvous, rank: int, what: str, bucket):
        self._work, self._buffer, self._rdv, self._rank = work, buffer, rdv, rank
        self._what, self._bucket = what, bucket

    def wait(self) -> torch.Tensor:
        try:
            self._work.wait(datetime.timedelta(seconds=self._rdv.timeout_s))
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
            raise transport_error(
                self._what,
                exc,
                self._rdv.peers_of(self._rank),
                self._bucket,
                self._rdv.timeout_s,
            ) from exc
        return self._buffer


def _broadcast(
    group, buffer: torch.Tensor, bucket: Bucket, rdv: Rendezvous, rank: int, what: str
) -> _Work:
    """Starts the broadcast of ``bucket`` (root: rank 0); a failure to start it is typed too."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    try:
        work = group.broadcast([buffer[: bucket.nbytes]], opts)
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
        raise transport_error(what, exc, rdv.peers_of(rank), bucket.index) from exc
    return _Work(work, buffer, rdv, rank, what, bucket.index)


class CollectiveSender(SenderTransport):
    """Rank 0 of the group: broadcasts each bucket."""

    def __init__(self, rdv: Rendezvous, store, device: torch.device | None = None):
        self._rdv = rdv
        self._group = new_group(rdv, store, 0, device or torch.device("cpu"))
        self.messages, self.timeout_s, self.peer = store, rdv.timeout_s, rdv.peers_of(0)

    @override
    def send(self, bucket: Bucket, buffer: torch.Tensor) -> Pending:
        return _broadcast(self._group, buffer, bucket, self._rdv, 0, "broadcast")

    @override
    def close(self) -> None:
        self._group = None


class CollectiveReceiver(ReceiverTransport):
    """A receiving member: two pre-touched buffers, used alternately."""

    def __init__(self, rdv: Rendezvous, rank: int, buffer_bytes: int, device: torch.device):
        from weight_sync.store import join_store

        self._rdv, self._rank = rdv, rank
        store = join_store(rdv.host, rdv.port, rdv.world_size, rdv.timeout_s, rdv.key)
        self._group = new_group(rdv, store, rank, device)
        self.messages, self.timeout_s, self.peer = store, rdv.timeout_s, rdv.peers_of(rank)
        # Written once here so that receiving never page-faults (fresh buffers cost several
        # times the transfer: docs/design.md, section 8a).
        self._buffers = [torch.zeros(buffer_bytes, dtype=torch.uint8, device=device) for _ in "ab"]

    @override
    def receive(self, bucket: Bucket) -> Pending:
        buffer = self._buffers[bucket.index % 2]
        if bucket.nbytes > buffer.numel():
            raise WeightSyncError(
                f"bucket {bucket.index} has {bucket.nbytes} bytes but the receive buffers hold "
                f"{buffer.numel()}; re-initialise the sync with the new plan",
                bucket=bucket.index,
            )
        return _broadcast(self._group, buffer, bucket, self._rdv, self._rank, "receive")

    @override
    def done(self, bucket: Bucket) -> None:
        # The sender never waits for receivers here: the broadcast itself is the handshake.
        return None

    @override
    def close(self) -> None:
        self._group = None
        self._buffers = []
