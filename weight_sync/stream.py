"""The two streaming loops of a sync, written once: double-buffered send and receive.

Both walk a bucket plan in order with at most two buckets in flight per side; what happens to
each bucket (gather and pack on the sender, verify and apply on the receiver) is a hook. The
trainer's sender, the engine's receiver and the benchmarks all run these loops.

Send, per bucket ``i`` (buffer ``i % 2``): wait until that buffer's previous sends finished;
``fill(bucket, buffer)`` (gather + pack; called with ``buffer=None`` once a transport has
failed, so that collective gathers are still entered by this rank); hand the buffer to every
transport; ``after_bucket(index)``. A transport error is kept until the plan has been walked,
then raised (after it, nothing more is sent and no further send is waited for: each is
bounded by its own transport timeout).

Receive, per bucket ``i``: wait for it; post the receive of bucket ``i + 1`` (so it travels
while this one is applied); ``apply(bucket, buffer)``; tell the transport the buffer is free.

Verification: when fingerprinting, the sender posts its manifest (:func:`manifest_key`) after
the last bucket and each receiver compares against it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from weight_sync.buckets import Bucket
from weight_sync.transport import Pending, ReceiverTransport, SenderTransport

__all__ = ["StreamStats", "send_stream", "receive_stream", "manifest_key"]


def manifest_key(version: int, sequence: int = 0) -> str:
    """Where a sync's manifest (the sender's fingerprints) travels: the group's message store.

    The sender posts it after its last bucket; every receiver compares what it received with
    it, so a sync is verified where it lands, with no round trip through the driver. The
    driver's sync ``sequence`` makes the key unique even where a version number repeats.
    """
    return f"manifest/{version}/{sequence}"


@dataclass
class StreamStats:
    """Where one side's time went in one stream (seconds) and what it moved."""

    seconds: float = 0.0
    wait_s: float = 0.0  # waiting for a buffer (send) or a bucket (receive)
    work_s: float = 0.0  # inside the hook: fill (send) or apply (receive)
    bytes: int = 0


def send_stream(
    buckets: Sequence[Bucket],
    buffers: Sequence[torch.Tensor],
    transports: Sequence[SenderTransport],
    fill: Callable[[Bucket, torch.Tensor | None], None],
    *,
    after_bucket: Callable[[int], None] | None = None,
) -> StreamStats:
    """Sends every bucket through every transport, two buffers in flight (see the module doc).

    Args:
        buckets: The plan's buckets, in order.
        buffers: Two send buffers (empty when this rank sends nothing but must still fill).
        transports: Where each bucket goes (may be empty).
        fill: Packs ``bucket`` into ``buffer``; ``buffer`` is None when nothing is sent.
        after_bucket: Called with each bucket's index once it is handed over.

    Raises:
        Exception: The first transport error, after every bucket was filled.
    """
    stats = StreamStats()
    start = time.perf_counter()
    sending = bool(transports) and bool(buffers)
    in_flight: list[list[Pending]] = [[], []]
    error: BaseException | None = None
    for bucket in buckets:
        slot = bucket.index % 2
        t0 = time.perf_counter()
        error = error or _wait_all(in_flight[slot])
        in_flight[slot] = []
        live = sending and error is None
        t1 = time.perf_counter()
        buffer = buffers[slot] if live else None
        fill(bucket, buffer)
        stats.work_s += time.perf_counter() - t1
        stats.wait_s += t1 - t0
        if buffer is not None:
            try:
                in_flight[slot] = [t.send(bucket, buffer) for t in transports]
                stats.bytes += bucket.nbytes
            except Exception as exc:  # noqa: BLE001 - kept until every bucket is filled
                error = exc
        if after_bucket is not None:
            after_bucket(bucket.index)
    t0 = time.perf_counter()
    for ops in in_flight:
        error = error or _wait_all(ops)
    stats.wait_s += time.perf_counter() - t0
    if error is not None:
        raise error
    stats.seconds = time.perf_counter() - start
    return stats


def receive_stream(
    buckets: Sequence[Bucket],
    transport: ReceiverTransport,
    apply: Callable[[Bucket, torch.Tensor], None],
) -> StreamStats:
    """Receives every bucket, the next one posted before the current one is applied.

    Args:
        buckets: The plan's buckets, in order (the sender walks the same plan).
        transport: The receiving side of the group.
        apply: Uses ``buffer`` (valid until this hook returns) for ``bucket``.
    """
    stats = StreamStats()
    start = time.perf_counter()
    pending = transport.receive(buckets[0]) if buckets else None
    for i, bucket in enumerate(buckets):
        t0 = time.perf_counter()
        buffer = pending.wait()
        t1 = time.perf_counter()
        if i + 1 < len(buckets):
            pending = transport.receive(buckets[i + 1])
        apply(bucket, buffer)
        transport.done(bucket)
        stats.wait_s += t1 - t0
        stats.work_s += time.perf_counter() - t1
        stats.bytes += bucket.nbytes
    stats.seconds = time.perf_counter() - start
    return stats


def _wait_all(ops: list[Pending]) -> BaseException | None:
    """Waits for every op; returns the first failure instead of raising it."""
    error = None
    for op in ops:
        try:
            op.wait()
        except Exception as exc:  # noqa: BLE001
            error = error or exc
    return error
