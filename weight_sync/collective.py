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
)

__all__ = ["CollectiveSender", "CollectiveReceiver", "new_group"]


def new_group(rdv: Rendezvous, store, rank: int, device: torch.device):
    """Creates this member's process group over ``store`` (already under the per-run prefix)."""
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
    def __init__(self, work, buffer: torch.Tensor, timeout_s: float, what: str):
        self._work, self._buffer, self._timeout_s, self._what = work, buffer, timeout_s, what

    def wait(self) -> torch.Tensor:
        try:
            self._work.wait(datetime.timedelta(seconds=self._timeout_s))
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
            raise WeightSyncError(
                f"{self._what} failed or timed out after {self._timeout_s:g} s: {exc}"
            ) from exc
        return self._buffer


def _broadcast(group, buffer: torch.Tensor, nbytes: int) -> object:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return group.broadcast([buffer[:nbytes]], opts)


class CollectiveSender(SenderTransport):
    """Rank 0 of the group: broadcasts each bucket."""

    def __init__(self, rdv: Rendezvous, store, device: torch.device | None = None):
        self._rdv = rdv
        self._group = new_group(rdv, store, 0, device or torch.device("cpu"))
        self.messages, self.timeout_s = store, rdv.timeout_s

    @override
    def send(self, bucket: Bucket, buffer: torch.Tensor) -> Pending:
        work = _broadcast(self._group, buffer, bucket.nbytes)
        return _Work(work, buffer, self._rdv.timeout_s, f"broadcast of bucket {bucket.index}")

    @override
    def close(self) -> None:
        self._group = None


class CollectiveReceiver(ReceiverTransport):
    """A receiving member: two pre-touched buffers, used alternately."""

    def __init__(self, rdv: Rendezvous, rank: int, buffer_bytes: int, device: torch.device):
        from weight_sync.store import join_store

        self._rdv = rdv
        store = join_store(rdv.host, rdv.port, rdv.world_size, rdv.timeout_s, rdv.key)
        self._group = new_group(rdv, store, rank, device)
        self.messages, self.timeout_s = store, rdv.timeout_s
        # Written once here so that receiving never page-faults (fresh buffers cost 3-9x the
        # transfer on the build machine).
        self._buffers = [torch.zeros(buffer_bytes, dtype=torch.uint8, device=device) for _ in "ab"]

    @override
    def receive(self, bucket: Bucket) -> Pending:
        buffer = self._buffers[bucket.index % 2]
        if bucket.nbytes > buffer.numel():
            raise WeightSyncError(
                f"bucket {bucket.index} has {bucket.nbytes} bytes but the receive buffers hold "
                f"{buffer.numel()}; re-initialise the sync with the new plan"
            )
        work = _broadcast(self._group, buffer, bucket.nbytes)
        return _Work(work, buffer, self._rdv.timeout_s, f"receive of bucket {bucket.index}")

    @override
    def done(self, bucket: Bucket) -> None:
        # The sender never waits for receivers here: the broadcast itself is the handshake.
        return None

    @override
    def close(self) -> None:
        self._group = None
        self._buffers = []
