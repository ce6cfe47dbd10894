"""Bucket layout: which tensors travel together, at which byte offsets. Pure; no transport.

vLLM fuses some checkpoint tensors into one parameter (``q_proj``/``k_proj``/``v_proj`` into
``qkv_proj``, ``gate_proj``/``up_proj`` into ``gate_up_proj``, a MoE layer's experts into
``w13_weight``/``w2_weight``), as the engine's :class:`weight_sync.packing.Packing` describes.
Loading part of such a group corrupts the layer on the CPU backend, so a group is the unit of
packing: the planner never splits one across buckets, and :class:`BucketPlan` refuses a layout
that does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from placement.hardware import DeviceKind
from weight_sync.errors import BucketPlanError
from weight_sync.packing import Packing

__all__ = [
    "TensorMeta",
    "TensorSlot",
    "Bucket",
    "BucketPlan",
    "plan_buckets",
    "default_bucket_bytes",
]

_ALIGN = 64  # byte alignment of every tensor in a bucket: any dtype view is aligned


@dataclass(frozen=True)
class TensorMeta:
    """Name (HF checkpoint name), shape and dtype of one tensor as the engine will receive it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes in the engine's dtype."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class TensorSlot:
    """A tensor's place in its bucket."""

    meta: TensorMeta
    offset: int


@dataclass(frozen=True)
class Bucket:
    """Tensors packed into one flat byte buffer, sent and applied as one unit."""

    index: int
    slots: tuple[TensorSlot, ...]
    nbytes: int

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in packing order."""
        return tuple(s.meta.name for s in self.slots)

    def views(self, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Typed, shaped views into ``buffer`` (a uint8 tensor of at least ``nbytes``)."""
        out = []
        for s in self.slots:
            raw = buffer[s.offset : s.offset + s.meta.nbytes]
            out.append((s.meta.name, raw.view(s.meta.dtype).view(s.meta.shape)))
        return out


@dataclass(frozen=True)
class BucketPlan:
    """An ordered list of buckets; validated so that no fused group is split.

    Attributes:
        buckets: The buckets, in sending order.
        bucket_bytes: The requested bucket size (a bucket is larger only when a single fused
            group is larger; :attr:`max_bucket_bytes` is the real bound on a buffer).
        packing: The engine's packing the plan was checked against.
    """

    buckets: tuple[Bucket, ...]
    bucket_bytes: int
    packing: Packing

    def __post_init__(self) -> None:
        if self.bucket_bytes <= 0:
            raise BucketPlanError(
                f"bucket_bytes={self.bucket_bytes!r}: must be > 0; fix: pass e.g. 32 << 20"
            )
        home: dict[str, int] = {}
        seen: set[str] = set()
        for b in self.buckets:
            end = 0
            for s in b.slots:
                if s.meta.name in seen:
                    raise BucketPlanError(f"tensor {s.meta.name!r} appears twice in the plan")
                seen.add(s.meta.name)
                if s.offset < end or s.offset % _ALIGN:
                    raise BucketPlanError(
                        f"bucket {b.index}: tensor {s.meta.name!r} at offset {s.offset} overlaps "
                        f"the previous tensor or is not {_ALIGN}-byte aligned"
                    )
                end = s.offset + s.meta.nbytes
                key = self.packing.engine_name(s.meta.name)
                if home.setdefault(key, b.index) != b.index:
                    raise BucketPlanError(
                        f"fused group {key!r} is split between bucket {home[key]} and bucket "
                        f"{b.index} (at {s.meta.name!r}); the engine would load a partial "
                        "group and corrupt the layer. Fix: keep a group's tensors in one bucket "
                        "(plan_buckets does)"
                    )
            if end > b.nbytes:
                raise BucketPlanError(f"bucket {b.index}: tensors end at {end} > nbytes={b.nbytes}")

    @property
    def max_bucket_bytes(self) -> int:
        """Size of the largest bucket: what each transfer buffer must hold."""
        return max((b.nbytes for b in self.buckets), default=0)

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors (without alignment padding)."""
        return sum(s.meta.nbytes for b in self.buckets for s in b.slots)

    @property
    def metas(self) -> list[TensorMeta]:
        """Every tensor, in sending order."""
        return [s.meta for b in self.buckets for s in b.slots]


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plan_buckets(
    metas: Iterable[TensorMeta],
    bucket_bytes: int,
    packing: Packing,
) -> BucketPlan:
    """Packs tensors into buckets of at most ``bucket_bytes``, keeping fused groups whole.

    Tensors keep their order, except that the members of a fused group are pulled together at
    the position of the group's first member. Groups are packed greedily; a group that does
    not fit in the current bucket starts a new one, and a group larger than ``bucket_bytes``
    gets a bucket of its own (so :attr:`BucketPlan.max_bucket_bytes` can exceed the request).

    Args:
        metas: Tensors as the engine receives them (HF names, engine dtype).
        bucket_bytes: Target bucket size in bytes; must be > 0.
        packing: Which tensors the engine fuses (its :class:`Packing`).

    Returns:
        The validated plan.
    """
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise BucketPlanError(
            f"bucket_bytes={bucket_bytes!r}: must be an int > 0; fix: pass e.g. 32 << 20"
        )
    groups: dict[str, list[TensorMeta]] = {}
    for m in metas:
        groups.setdefault(packing.engine_name(m.name), []).append(m)
    buckets: list[Bucket] = []
    current: list[TensorSlot] = []
    used = 0

    def close() -> None:
        nonlocal current, used
        if current:
            buckets.append(Bucket(len(buckets), tuple(current), used))
        current, used = [], 0

    for members in groups.values():
        size = sum(_aligned(m.nbytes) for m in members)
        if current and used + size > bucket_bytes:
            close()
        for m in members:
            current.append(TensorSlot(m, used))
            used += _aligned(m.nbytes)
    close()
    return BucketPlan(tuple(buckets), bucket_bytes, packing)


def default_bucket_bytes(device: DeviceKind) -> int:
    """Default bucket size by device: 512 MiB on CUDA (as slime uses), 32 MiB on CPU.

    On CPU, measured on the build machine, 32 MiB buckets were the best trade between the
    number of apply calls and the peak extra memory (two buffers in flight on each side).
    ``device`` is the reservation's (what the placement probe found on the bundles).
    """
    return (512 << 20) if DeviceKind(device) is DeviceKind.CUDA else (32 << 20)
