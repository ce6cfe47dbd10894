"""Store and gloo failures in the weight transports surface as ``WeightSyncError``.

Pure torch (no Ray): a real TCPStore and real gloo groups, their members in threads of this
process, with short timeouts. Each error names the peer (the group's address and rank) and,
once streaming, the bucket.
"""

from __future__ import annotations

import pickle
import socket
import threading
import time
import uuid

import pytest
import torch

from weight_sync import Backend, Rendezvous, WeightSyncError
from weight_sync.buckets import Bucket
from weight_sync.collective import CollectiveReceiver, CollectiveSender
from weight_sync.store import host_store, join_store

pytestmark = [pytest.mark.fast, pytest.mark.timeout(60)]

TIMEOUT_S = 1.0


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous(port: int, key: str) -> Rendezvous:
    return Rendezvous("127.0.0.1", port, 2, key, TIMEOUT_S, Backend.GLOO)


def _group():
    """A sender and a receiver of one gloo group (built concurrently, as in a sync)."""
    key = uuid.uuid4().hex
    store, port, sock = host_store("127.0.0.1", 2, TIMEOUT_S, key)
    rdv = _rendezvous(port, key)
    made: dict = {}

    def receiver():
        made["receiver"] = CollectiveReceiver(rdv, 1, 1024, torch.device("cpu"))

    thread = threading.Thread(target=receiver)
    thread.start()
    sender = CollectiveSender(rdv, store)
    thread.join(10)
    return sender, made["receiver"], rdv, (store, sock)


def test_unreachable_store_names_its_address():
    port = _closed_port()
    with pytest.raises(WeightSyncError, match=rf"store at 127\.0\.0\.1:{port}") as info:
        join_store("127.0.0.1", port, 2, TIMEOUT_S, "k")
    assert info.value.peer == f"127.0.0.1:{port}"
    assert info.value.__cause__ is not None  # the store's own error is kept


def test_group_that_never_forms_names_the_rank_and_the_sender():
    key = uuid.uuid4().hex
    store, port, sock = host_store("127.0.0.1", 2, TIMEOUT_S, key)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="as rank 1") as info:
        # The sender never builds its side of the group.
        CollectiveReceiver(_rendezvous(port, key), 1, 1024, torch.device("cpu"))
    assert time.monotonic() - start < 30  # bounded by the rendezvous timeout, not a hang
    assert info.value.peer == f"sender (rank 0) of the gloo group at 127.0.0.1:{port}"
    assert info.value.bucket is None
    del store, sock


def test_bucket_the_sender_never_sends_names_peer_and_bucket():
    sender, receiver, rdv, keep = _group()
    bucket = Bucket(index=3, slots=(), nbytes=64)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"receive of bucket 3 with the sender") as info:
        receiver.receive(bucket).wait()  # the sender never broadcasts it
    assert time.monotonic() - start < 30
    assert info.value.bucket == 3
    assert info.value.peer == rdv.peers_of(1)
    assert f"127.0.0.1:{rdv.port}" in str(info.value)
    sender.close()
    receiver.close()


def test_a_bucket_that_moves_is_not_an_error():
    """The same group moves a bucket when both sides take part (the failures above are real)."""
    sender, receiver, rdv, keep = _group()
    bucket = Bucket(index=0, slots=(), nbytes=16)
    payload = torch.arange(16, dtype=torch.uint8)
    got: dict = {}
    thread = threading.Thread(target=lambda: got.update(b=receiver.receive(bucket).wait()))
    thread.start()
    sender.send(bucket, payload.clone()).wait()
    thread.join(10)
    assert torch.equal(got["b"][:16], payload)
    sender.close()
    receiver.close()


def test_sender_peer_names_the_receivers():
    rdv = _rendezvous(4711, "k")
    assert rdv.peers_of(0) == "receivers (ranks 1-1) of the gloo group at 127.0.0.1:4711"


def test_weight_sync_error_keeps_peer_and_bucket_across_pickle():
    """It crosses Ray (pickled) from an engine worker to the driver with its fields."""
    err = pickle.loads(pickle.dumps(WeightSyncError("x", peer="p", bucket=2)))
    assert (str(err), err.peer, err.bucket) == ("x", "p", 2)


def test_cuda_ipc_receiver_without_a_sender_names_it():
    """The CUDA IPC receiver's first wait (the sender's buffer handles) needs no GPU to fail."""
    from weight_sync.cuda_ipc import IpcReceiver

    key = uuid.uuid4().hex
    store, port, sock = host_store("127.0.0.1", 2, TIMEOUT_S, key)
    rdv = Rendezvous("127.0.0.1", port, 2, key, TIMEOUT_S, Backend.CUDA_IPC)
    with pytest.raises(WeightSyncError, match="IPC handles: no answer from the sender") as info:
        IpcReceiver(rdv, 1, torch.device("cpu"))
    assert info.value.peer == f"sender (rank 0) of the cuda_ipc group at 127.0.0.1:{port}"
    del store, sock
