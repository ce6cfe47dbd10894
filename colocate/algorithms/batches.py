"""Rows of a batch: counting, slicing, sharding over ranks, weighting micro-batches.

A batch is a dict of tensors or lists with one row per sequence; other values (scalars) pass
through every cut. The plan of micro-batches itself is pure (``colocate.algorithms.micro_batches``).
"""

from __future__ import annotations

import torch

from colocate.algorithms.micro_batches import MicroBatch, plan_step, token_weights

__all__ = ["batch_rows", "slice_rows", "shard_batch", "weighted_parts"]


def batch_rows(batch: dict) -> int:
    """Rows of a batch: the length of its first tensor or list (scalars pass through)."""
    return len(next(v for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))))


def slice_rows(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor or list in ``batch`` (other values as they are)."""
    return {
        k: v[start:stop] if isinstance(v, (torch.Tensor, list, tuple)) else v
        for k, v in batch.items()
    }


def shard_batch(batch: dict, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s contiguous share of the rows of every tensor or list in ``batch``.

    Rows are split as evenly as possible (the first ``rows % world_size`` ranks get one more);
    other values are passed through.
    """
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))}
    if len(sizes) != 1:
        raise ValueError(f"batch fields have different lengths {sorted(sizes)}; pass equal rows")
    (rows,) = sizes
    if rows < world_size:
        raise ValueError(
            f"batch has {rows} rows for {world_size} trainer ranks; pass at least one row a rank"
        )
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return slice_rows(batch, start, stop)


def weighted_parts(shard: dict, step: list[MicroBatch], loss_tokens: str) -> list[tuple]:
    """The micro-batches of one optimizer step as (rows, weight), weighted by loss tokens.

    A filler (an empty micro-batch of a rank with fewer rows) is one real row with weight 0:
    its forward keeps this rank's collectives in step and adds nothing. ``loss_tokens`` names
    the mask whose sum counts a micro-batch's tokens (rows count when the batch has none).
    """
    rows = batch_rows(shard)
    parts, tokens = [], []
    for mb in step:
        if mb.empty:
            start = min(mb.start, rows - 1)
            parts.append(slice_rows(shard, start, start + 1))
            tokens.append(0.0)
            continue
        part = slice_rows(shard, mb.start, mb.stop)
        mask = part.get(loss_tokens)
        parts.append(part)
        tokens.append(float(mask.sum()) if mask is not None else float(mb.stop - mb.start))
    return list(zip(parts, token_weights(tokens), strict=True))


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
    batch: dict, world_size: int, mini_batches: int, micro_batch_size: int
) -> tuple[list[dict], int]:
    """One contiguous shard of ``batch`` per rank, and the largest shard's row count.

    Every rank is told the largest count, so that all take the same number of optimizer
    steps and micro-batches (ZeRO's collectives need every rank in each).

    Raises:
        ValueError: A batch that cannot be cut so (ragged columns, fewer rows than ranks or
            than the micro-batch plan needs), before anything is sent.
    """
    shards = [shard_batch(batch, r, world_size) for r in range(world_size)]
    max_rows = max(batch_rows(s) for s in shards)
    plan_step(max_rows, max_rows, mini_batches, micro_batch_size)
    return shards, max_rows
