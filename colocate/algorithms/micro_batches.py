"""How one rank's shard of a batch is cut into optimizer steps and micro-batches. Pure; no torch.

A train call takes ``mini_batches`` optimizer steps per epoch over the shard (PPO-style epochs
and mini-batches), and each step accumulates gradients over micro-batches of at most
``micro_batch_size`` rows. Under ZeRO-3 every forward and backward gathers parameters with
collectives, so every rank must run the same number of micro-batches in every step even when
shards differ by a row: the counts come from the largest shard, and a rank with fewer rows
than micro-batches runs an empty one as a zero-weight forward on one of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MicroBatch", "plan_step", "token_weights"]


@dataclass(frozen=True)
class MicroBatch:
    """Rows ``[start, stop)`` of the shard; ``start == stop`` is a zero-weight filler."""

    start: int
    stop: int

    @property
    def empty(self) -> bool:
        """A filler: only there to keep this rank's collectives in step with the others."""
        return self.stop == self.start


def _split(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges over ``rows``, as even as possible (the first get more)."""
    base, extra = divmod(rows, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def plan_step(
    rows: int, max_rows: int, mini_batches: int = 1, micro_batch_size: int | None = None
) -> list[list[MicroBatch]]:
    """The micro-batches of each optimizer step of one epoch over a shard of ``rows`` rows.

    Args:
        rows: This rank's rows.
        max_rows: The largest rank's rows (every rank plans the same counts from it).
        mini_batches: Optimizer steps per epoch; the shard is cut into this many parts.
        micro_batch_size: Most rows per forward/backward; None runs each part in one.

    Returns:
        One list per optimizer step, of that step's micro-batches in order.

    Raises:
        ValueError: ``rows`` > ``max_rows``, fewer rows than optimizer steps on the largest
            shard, or a size below 1.
    """
    if mini_batches < 1 or (micro_batch_size is not None and micro_batch_size < 1):
        raise ValueError(
            f"mini_batches={mini_batches}, micro_batch_size={micro_batch_size}: must be >= 1"
        )
    if not 0 < rows <= max_rows:
        raise ValueError(f"rows={rows} must be in [1, max_rows={max_rows}]")
    if max_rows < mini_batches:
        raise ValueError(
            f"a shard of {max_rows} rows cannot make {mini_batches} optimizer steps; fix: pass "
            f"at least {mini_batches} rows per trainer rank, or fewer mini_batches"
        )
    steps = []
    for (start, stop), (lo, hi) in zip(
        _split(rows, mini_batches), _split(max_rows, mini_batches), strict=True
    ):
        count = 1 if micro_batch_size is None else -(-(hi - lo) // micro_batch_size)
        steps.append([MicroBatch(start + a, start + b) for a, b in _split(stop - start, count)])
    return steps


def token_weights(tokens: list[float]) -> list[float]:
    """Each micro-batch's share of one optimizer step's loss tokens (fillers have 0 tokens).

    With a loss that is the mean over its own tokens, weighting micro-batch ``i`` by
    ``tokens[i] / sum(tokens)`` makes the accumulated gradient that of the mean over all the
    step's tokens: the full-batch step. A step without loss tokens gets zero weights (its
    full-batch loss, a mean over no tokens, has no gradient either).
    """
    total = sum(tokens)
    if total <= 0:
        return [0.0] * len(tokens)
    return [t / total for t in tokens]
