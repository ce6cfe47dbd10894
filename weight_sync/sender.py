"""The trainer side of a sync: gather, cast and pack each bucket, send it, two buckets in flight.

The loop is :func:`weight_sync.stream.send_stream`: per bucket ``i`` (buffer ``i % 2``), wait
until that buffer's previous send finished; gather the bucket's parameters (a collective under
ZeRO-3, entered by every trainer rank in the same order); cast-copy them into the buffer;
fingerprint what was packed (if verifying); start sending. Packing bucket ``i + 1`` thus
overlaps the transfer of bucket ``i``.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from weight_sync.buckets import BucketPlan
from weight_sync.fingerprint import Fingerprint, fingerprint
from weight_sync.sources import WeightSource
from weight_sync.stream import manifest_key, send_stream
from weight_sync.transport import SenderTransport

__all__ = ["SendReport", "WeightSender"]


@dataclass
class SendReport:
    """What one trainer rank did in one sync."""

    version: int
    bytes_sent: int = 0
    seconds: float = 0.0
    gather_s: float = 0.0
    pack_s: float = 0.0
    wait_s: float = 0.0
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)


class WeightSender:
    """Streams a source's weights through zero or more transports, following a bucket plan.

    A trainer rank with no transports still walks the plan when the source is collective
    (ZeRO-3): its shards are needed for every gather.
    """

    def __init__(self, source: WeightSource, plan: BucketPlan, device: torch.device):
        self.source = source
        self.plan = plan
        self.device = device
        self.transports: list[SenderTransport] = []
        self.buffers: tuple[torch.Tensor, ...] = ()
        # Typed views of each bucket into its buffer, made once: building them costs more CPU
        # time than a CUDA copy of a small tensor (measured on an H200, docs/gpu-results.md).
        self._views: dict[int, list[tuple[str, torch.Tensor]]] = {}

    def allocate_buffers(self) -> tuple[torch.Tensor, ...]:
        """Allocates (and touches) the two bucket buffers; idempotent."""
        if not self.buffers:
            size = self.plan.max_bucket_bytes
            self.buffers = tuple(
                torch.zeros(size, dtype=torch.uint8, device=self.device) for _ in range(2)
            )
            self._views = {}
        return self.buffers

    def _bucket_views(self, bucket) -> list[tuple[str, torch.Tensor]]:
        views = self._views.get(bucket.index)
        if views is None:
            views = self._views[bucket.index] = bucket.views(self.buffers[bucket.index % 2])
        return views

    def send(
        self,
        version: int,
        *,
        verify: bool,
        sequence: int = 0,
        after_bucket: Callable[[int], None] | None = None,
    ) -> SendReport:
        """Runs one sync through every transport; returns timings and fingerprints if verifying.

        The loop is :func:`weight_sync.stream.send_stream`; this sender's hook gathers a
        bucket's parameters (collective under ZeRO-3) and cast-copies them into the buffer. If
        a transport fails, this rank stops sending but still enters every remaining gather
        (under ZeRO-3 the other trainer ranks are in those collectives: leaving early would
        leave them out of step), then raises the first transport error.

        Args:
            version: The weight version being sent.
            verify: Fingerprint every packed tensor.
            sequence: The driver's number of this sync (keys the manifest).
            after_bucket: Called with each bucket's index once it is handed to the transports.
        """
        report = SendReport(version=version)
        if not self.transports and not self.source.collective:
            return report
        if self.transports:
            self.allocate_buffers()

        def fill(bucket, buffer) -> None:
            t0 = time.perf_counter()
            with self.source.gathered(bucket.names) as tensors:
                t1 = time.perf_counter()
                if buffer is not None:
                    for name, view in self._bucket_views(bucket):
                        view.copy_(tensors[name])
                        if verify:
                            report.fingerprints[name] = fingerprint(view)
            report.gather_s += t1 - t0
            report.pack_s += time.perf_counter() - t1

        stats = send_stream(
            self.plan.buckets, self.buffers, self.transports, fill, after_bucket=after_bucket
        )
        if verify:  # the manifest travels with the buckets: each receiver checks itself
            manifest = pickle.dumps(report.fingerprints)
            for t in self.transports:
                t.publish(manifest_key(version, sequence), manifest)
        report.bytes_sent = stats.bytes
        report.wait_s = stats.wait_s
        report.seconds = stats.seconds
        return report

    def close(self) -> None:
        """Closes every transport and frees the buffers."""
        for t in self.transports:
            t.close()
        self.transports = []
        self.buffers = ()
        self._views = {}
