"""Rows of a batch: counting, slicing, sharding over ranks, weighting micro-batches.

A batch is a dict of tensors or lists with one row per sequence; other values (scalars) pass
through every cut. The plan of micro-batches itself is pure (``colocate.algorithms.micro_batches``).
"""

from __future__ import annotations

import torch

from colocate.algorithms.micro_batches import (
    MicroBatch,
    PackedMicroBatch,
    balanced_bins,
    fewest_bins,
    plan_step,
    token_weights,
)
from colocate.algorithms.packing import pack, sequence_lengths

__all__ = [
    "batch_rows",
    "slice_rows",
    "take_rows",
    "shard_batch",
    "shard_by_tokens",
    "counted_parts",
    "counted_packed_parts",
    "weigh_parts",
]


def batch_rows(batch: dict) -> int:
    """Rows of a batch: the length of its first tensor or list (scalars pass through)."""
    return len(next(v for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))))


def slice_rows(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor or list in ``batch`` (other values as they are)."""
    return {
        k: v[start:stop] if isinstance(v, (torch.Tensor, list, tuple)) else v
        for k, v in batch.items()
    }


def take_rows(batch: dict, rows: list[int]) -> dict:
    """Rows ``rows`` (in that order) of every tensor or list in ``batch``; others as they are."""
    index = torch.tensor(rows, dtype=torch.long)
    return {
        k: v[index]
        if isinstance(v, torch.Tensor)
        else [v[r] for r in rows]
        if isinstance(v, (list, tuple))
        else v
        for k, v in batch.items()
    }


def _rows_check(batch: dict, world_size: int) -> int:
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))}
    if len(sizes) != 1:
        raise ValueError(f"batch fields have different lengths {sorted(sizes)}; pass equal rows")
    (rows,) = sizes
    if rows < world_size:
        raise ValueError(
            f"batch has {rows} rows for {world_size} trainer ranks; pass at least one row a rank"
        )
    return rows


def shard_by_tokens(batch: dict, world_size: int) -> tuple[list[dict], list[int]]:
    """One shard per rank with near-equal tokens (not rows), and the order of their rows.

    Rows are spread by :func:`colocate.algorithms.micro_batches.balanced_bins` over their
    lengths (``attention_mask``), each rank getting at least one and its rows in batch order.
    An answer per row concatenated in rank order is put back in batch order by
    ``argsort(order)``.

    Returns:
        ``(shards, order)``: ``order`` lists the batch's rows as the shards hold them.
    """
    _rows_check(batch, world_size)
    bins = balanced_bins(sequence_lengths(batch), world_size)
    return [take_rows(batch, list(b)) for b in bins], [r for b in bins for r in b]


def shard_batch(batch: dict, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s contiguous share of the rows of every tensor or list in ``batch``.

    Rows are split as evenly as possible (the first ``rows % world_size`` ranks get one more);
    other values are passed through.
    """
    rows = _rows_check(batch, world_size)
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return slice_rows(batch, start, stop)


def counted_parts(shard: dict, step: list[MicroBatch], loss_tokens: str) -> list[tuple]:
    """The micro-batches of one optimizer step as (rows, loss tokens).

    A filler (an empty micro-batch of a rank with fewer rows) is one real row with 0 tokens:
    its forward keeps this rank's collectives in step and, weighted 0
    (:func:`colocate.algorithms.micro_batches.token_weights`), adds nothing. ``loss_tokens``
    names the mask whose sum counts a micro-batch's tokens (rows count when the batch has
    none).
    """
    rows = batch_rows(shard)
    out = []
    for mb in step:
        if mb.empty:
            start = min(mb.start, rows - 1)
            out.append((slice_rows(shard, start, start + 1), 0.0))
            continue
        part = slice_rows(shard, mb.start, mb.stop)
        mask = part.get(loss_tokens)
        out.append((part, float(mask.sum()) if mask is not None else float(mb.stop - mb.start)))
    return out


def counted_packed_parts(
    shard: dict, step: list[PackedMicroBatch], loss_tokens: str, lengths: list[int]
) -> list[tuple]:
    """The packed micro-batches of one optimizer step as (packed batch, loss tokens).

    As :func:`counted_parts`; a filler packs this rank's shortest sequence and counts 0
    tokens (``colocate.algorithms.packing.pack``).
    """
    shortest = min(range(len(lengths)), key=lambda r: (lengths[r], r))
    out = []
    for mb in step:
        part = pack(shard, list(mb.rows) or [shortest], lengths)
        mask = part.get(loss_tokens)
        if mb.empty:
            out.append((part, 0.0))
        else:
            out.append((part, float(mask.sum()) if mask is not None else float(len(mb.rows))))
    return out


def weigh_parts(
    counted: list[tuple], total: float | None = None, world_size: int = 1
) -> list[tuple]:
    """``(part, tokens)`` of one optimizer step as ``(part, weight)``.

    Weights by :func:`colocate.algorithms.micro_batches.token_weights` (``total``: the step's
    tokens over the ``world_size`` ranks; None: this rank's own).
    """
    parts, tokens = zip(*counted, strict=True)
    return list(zip(parts, token_weights(list(tokens), total, world_size), strict=True))


def split_contiguous(items: list, parts: int) -> list[tuple[int, list]]:
    """``items`` cut into ``parts`` contiguous chunks of near-equal size.

    Returns:
        ``(offset, chunk)`` of each non-empty chunk, in order (``offset``: its first item's
        index in ``items``).
    """
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [
        (bounds[i], items[bounds[i] : bounds[i + 1]])
        for i in range(parts)
        if bounds[i + 1] > bounds[i]
    ]


def shard_for_ranks(
    batch: dict,
    world_size: int,
    mini_batches: int,
    micro_batch_size: int | None,
    max_tokens: int | None = None,
) -> tuple[list[dict], int]:
    """One shard of ``batch`` per rank, and the largest shard's row count.

    Contiguous shards of near-equal rows; with a token budget (``max_tokens``, packed
    micro-batches), shards of near-equal tokens (:func:`shard_by_tokens`). Every rank is told
    the largest count, so that all take the same number of optimizer steps and micro-batches
    (ZeRO's collectives need every rank in each; packed ranks agree on their micro-batch
    counts themselves, ``TrainerBackend.agree_max``).

    Raises:
        ValueError: A batch that cannot be cut so (ragged columns, fewer rows than ranks or
            than the micro-batch plan needs, a sequence over the token budget), before
            anything is sent.
    """
    if max_tokens is not None:
        fewest_bins(sequence_lengths(batch), max_tokens)  # a sequence over budget raises here
        shards, _ = shard_by_tokens(batch, world_size)
        max_rows = max(batch_rows(s) for s in shards)
        plan_step(max_rows, max_rows, mini_batches)  # enough rows for the optimizer steps
        return shards, max_rows
    shards = [shard_batch(batch, r, world_size) for r in range(world_size)]
    max_rows = max(batch_rows(s) for s in shards)
    plan_step(max_rows, max_rows, mini_batches, micro_batch_size)
    return shards, max_rows
