"""CUDA IPC transport: sender and receivers share one GPU, so buckets never leave it.

NCCL refuses two ranks on one GPU, which is exactly the colocated case. Here the sender's two
bucket buffers are exported once as CUDA IPC handles; each receiver maps them. Per bucket:
the sender packs into a free buffer, synchronises its stream and posts ``ready/<seq>`` in the
store; each receiver waits for it, applies straight from the mapped buffer, synchronises, and
posts ``ack/<seq>/<rank>``; the sender reuses that buffer only after every ack (so two buckets
at most are in flight). Every wait is bounded by the rendezvous timeout. CUDA only.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist
from typing_extensions import override

from weight_sync.buckets import Bucket
from weight_sync.errors import WeightSyncError
from weight_sync.store import wait_get
from weight_sync.transport import (
    Pending,
    ReceiverTransport,
    Rendezvous,
    SenderTransport,
    transport_error,
)

__all__ = ["IpcSender", "IpcReceiver"]

# Index of the device ordinal in the argument tuple of torch's rebuild_cuda_tensor.
_DEVICE_ARG = 6


def _store_op(what: str, peer: str, bucket: int | None, op, *args):
    """``op(*args)`` on the store; a failure becomes a ``WeightSyncError`` naming the peer."""
    try:
        return op(*args)
    except Exception as exc:  # noqa: BLE001 - the store raises RuntimeError/DistStoreError
        raise transport_error(what, exc, peer, bucket) from exc


class _Acks(Pending):
    def __init__(self, sender: IpcSender, seq: int, buffer: torch.Tensor, bucket: int):
        self._sender, self._seq, self._buffer, self._bucket = sender, seq, buffer, bucket

    def wait(self) -> torch.Tensor:
        s = self._sender
        for rank in range(1, s.receivers + 1):
            wait_get(
                s.store,
                f"ack/{self._seq}/{rank}",
                s.timeout_s,
                f"rank {rank}'s ack of bucket {self._bucket} (seq {self._seq})",
                peer=s.peer,
                bucket=self._bucket,
            )
        for rank in range(1, s.receivers + 1):
            _store_op(
                "clearing an ack",
                s.peer,
                self._bucket,
                s.store.delete_key,
                f"ack/{self._seq}/{rank}",
            )
        _store_op(
            "clearing a ready", s.peer, self._bucket, s.store.delete_key, f"ready/{self._seq}"
        )
        return self._buffer


class IpcSender(SenderTransport):
    """Exports the sender's bucket buffers and signals each bucket through the store."""

    def __init__(self, rdv: Rendezvous, store, buffers: tuple[torch.Tensor, ...]):
        from torch.multiprocessing.reductions import reduce_tensor

        if not all(b.is_cuda for b in buffers):
            raise WeightSyncError("CUDA IPC needs CUDA buffers; use the collective transport")
        self.store = dist.PrefixStore("ipc/", store)
        self.timeout_s = rdv.timeout_s
        self.messages = store
        self.peer = rdv.peers_of(0)
        self.receivers = rdv.world_size - 1
        self._buffers = buffers
        self._seq = 0
        handles = pickle.dumps([reduce_tensor(b) for b in buffers])
        _store_op("posting the IPC handles", self.peer, None, self.store.set, "handles", handles)

    @override
    def send(self, bucket: Bucket, buffer: torch.Tensor) -> Pending:
        slot = next(
            (i for i, b in enumerate(self._buffers) if b.data_ptr() == buffer.data_ptr()), None
        )
        if slot is None:
            raise WeightSyncError("CUDA IPC can only send from the buffers it exported")
        torch.cuda.current_stream(buffer.device).synchronize()  # packing is complete
        seq, self._seq = self._seq, self._seq + 1
        ready = pickle.dumps((slot, bucket.index, bucket.nbytes))
        _store_op("posting", self.peer, bucket.index, self.store.set, f"ready/{seq}", ready)
        return _Acks(self, seq, buffer, bucket.index)

    @override
    def close(self) -> None:
        self._buffers = ()


class _Ready(Pending):
    def __init__(self, receiver: IpcReceiver, seq: int, bucket: Bucket):
        self._receiver, self._seq, self._bucket = receiver, seq, bucket

    def wait(self) -> torch.Tensor:
        r = self._receiver
        raw = wait_get(
            r.store,
            f"ready/{self._seq}",
            r.timeout_s,
            f"bucket {self._bucket.index}",
            peer=r.peer,
            bucket=self._bucket.index,
        )
        slot, index, nbytes = pickle.loads(raw)
        if index != self._bucket.index or nbytes != self._bucket.nbytes:
            raise WeightSyncError(
                f"CUDA IPC out of step: expected bucket {self._bucket.index} "
                f"({self._bucket.nbytes} B), {r.peer} posted bucket {index} ({nbytes} B)",
                peer=r.peer,
                bucket=self._bucket.index,
            )
        return r.buffers[slot]


class IpcReceiver(ReceiverTransport):
    """Maps the sender's buffers; acknowledges each bucket once it has been applied."""

    def __init__(self, rdv: Rendezvous, rank: int, device: torch.device):
        from weight_sync.store import join_store

        store = join_store(rdv.host, rdv.port, rdv.world_size, rdv.timeout_s, rdv.key)
        self.store = dist.PrefixStore("ipc/", store)
        self.timeout_s = rdv.timeout_s
        self.messages = store
        self.peer = rdv.peers_of(rank)
        self._rank = rank
        handles = pickle.loads(
            wait_get(self.store, "handles", rdv.timeout_s, "IPC handles", peer=self.peer)
        )
        index = torch.device(device).index
        ordinal = torch.cuda.current_device() if index is None else index
        self.buffers = []
        for rebuild, args in handles:
            args = list(args)
            args[_DEVICE_ARG] = ordinal  # the sender's ordinal may differ (CUDA_VISIBLE_DEVICES)
            self.buffers.append(rebuild(*args))
        self._seq = 0
        self._seq_of: dict[int, int] = {}

    @override
    def receive(self, bucket: Bucket) -> Pending:
        seq, self._seq = self._seq, self._seq + 1
        self._seq_of[bucket.index] = seq
        return _Ready(self, seq, bucket)

    @override
    def done(self, bucket: Bucket) -> None:
        torch.cuda.current_stream().synchronize()  # the apply has read the buffer
        key = f"ack/{self._seq_of.pop(bucket.index)}/{self._rank}"
        _store_op("acknowledging", self.peer, bucket.index, self.store.set, key, b"1")

    @override
    def close(self) -> None:
        self.buffers = []
