"""How one rank's shard of a batch is cut into optimizer steps and micro-batches. Pure; no torch.

A train call takes ``mini_batches`` optimizer steps per epoch over the shard (PPO-style epochs
and mini-batches), and each step accumulates gradients over micro-batches of at most
``micro_batch_size`` rows. Under ZeRO-3 every forward and backward gathers parameters with
collectives, so every rank must run the same number of micro-batches in every step even when
shards differ by a row: the counts come from the largest shard, and a rank with fewer rows
than micro-batches runs an empty one as a zero-weight forward on one of its rows.

With a token budget (packed sequences, ``colocate.algorithms.packing``) a micro-batch is a set
of whole sequences of at most ``budget`` tokens, not a range of rows: :func:`plan_token_step`
spreads each optimizer step's sequences over micro-batches by a balanced partition of their
tokens, as many as the ranks agreed on (:func:`token_step_counts`, maximised over ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MicroBatch",
    "PackedMicroBatch",
    "plan_step",
    "token_weights",
    "balanced_bins",
    "fewest_bins",
    "token_step_counts",
    "plan_token_step",
]


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


def token_weights(
    tokens: list[float], total: float | None = None, world_size: int = 1
) -> list[float]:
    """Each micro-batch's weight in one optimizer step: ``world_size * tokens[i] / total``.

    With a loss that is the mean over its own tokens, weighting micro-batch ``i`` by its share
    of the step's loss tokens makes the accumulated gradient that of the mean over all the
    step's tokens: the full-batch step. Over data-parallel ranks (whose gradients DeepSpeed
    averages), ``total`` is the step's tokens summed over the ``world_size`` ranks, so that
    the step is the mean over every rank's tokens however the batch was sharded (None: this
    rank's own, ``world_size`` 1). Fillers have 0 tokens; a step without loss tokens gets
    zero weights (its full-batch loss, a mean over no tokens, has no gradient either).
    """
    total = sum(tokens) if total is None else total
    if total <= 0:
        return [0.0] * len(tokens)
    return [world_size * t / total for t in tokens]


@dataclass(frozen=True)
class PackedMicroBatch:
    """Rows of the shard packed into one forward, in row order; ``()`` is a zero-weight filler."""

    rows: tuple[int, ...]

    @property
    def empty(self) -> bool:
        """A filler: only there to keep this rank's collectives in step with the others."""
        return not self.rows


def _check_budget(lengths: Sequence[int], budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"max_tokens_per_micro_batch={budget!r}: must be an int >= 1")
    longest = max(lengths, default=0)
    if longest > budget:
        raise ValueError(
            f"a sequence of {longest} tokens exceeds max_tokens_per_micro_batch={budget}; fix: "
            f"raise the budget to at least {longest} (the engines' max_model_len covers any)"
        )


def balanced_bins(lengths: Sequence[int], count: int) -> list[tuple[int, ...]]:
    """The indices of ``lengths`` spread over ``count`` bins with near-equal token sums.

    Longest first into the bin with the fewest tokens so far (LPT; ties: the lower bin), each
    bin then in index order. A bin may be empty when ``count`` exceeds the sequences. Pure and
    deterministic.
    """
    bins: list[list[int]] = [[] for _ in range(count)]
    sums = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = min(range(count), key=lambda b: (sums[b], b))
        bins[b].append(i)
        sums[b] += lengths[i]
    return [tuple(sorted(b)) for b in bins]


def fewest_bins(lengths: Sequence[int], budget: int) -> int:
    """The fewest balanced bins (:func:`balanced_bins`) of at most ``budget`` tokens each.

    Raises:
        ValueError: A sequence longer than ``budget``.
    """
    _check_budget(lengths, budget)
    if not lengths:
        return 0
    count = max(1, -(-sum(lengths) // budget))
    # Terminates: with one bin per sequence every bin fits (no sequence exceeds the budget).
    while max(sum(lengths[i] for i in b) for b in balanced_bins(lengths, count)) > budget:
        count += 1
    return count


def _parts(lengths: Sequence[int], mini_batches: int) -> list[tuple[int, int]]:
    if mini_batches < 1:
        raise ValueError(f"mini_batches={mini_batches}: must be >= 1")
    if not lengths:
        raise ValueError("a shard of 0 sequences: pass at least one row per rank")
    return _split(len(lengths), mini_batches)


def token_step_counts(lengths: Sequence[int], budget: int, mini_batches: int = 1) -> list[int]:
    """Micro-batches each optimizer step of this shard needs under ``budget`` (at least 1).

    The ranks of a ZeRO group take the maximum over ranks of each count, so that every rank
    runs as many forwards and backwards as the others (:func:`plan_token_step`).
    """
    _check_budget(lengths, budget)
    return [max(1, fewest_bins(lengths[a:b], budget)) for a, b in _parts(lengths, mini_batches)]


def plan_token_step(
    lengths: Sequence[int], budget: int, mini_batches: int = 1, counts: Sequence[int] | None = None
) -> list[list[PackedMicroBatch]]:
    """The packed micro-batches of each optimizer step of one epoch over a shard.

    The shard's sequences are cut into ``mini_batches`` contiguous parts (one per optimizer
    step, as :func:`plan_step`); each part is spread over ``counts[k]`` micro-batches by
    :func:`balanced_bins`. When that spread would put more than ``budget`` tokens in one, the
    part keeps its own fewest bins and the rest are fillers (``rows == ()``).

    Args:
        lengths: Tokens of each sequence of this rank's shard, in row order.
        budget: Most tokens per micro-batch (``max_tokens_per_micro_batch``).
        mini_batches: Optimizer steps per epoch.
        counts: Micro-batches of each step agreed by every rank (None: this shard's own,
            :func:`token_step_counts`).

    Raises:
        ValueError: A sequence longer than ``budget``, fewer ``counts`` than steps, or a count
            below what the part needs.
    """
    own = token_step_counts(lengths, budget, mini_batches)
    counts = own if counts is None else list(counts)
    if len(counts) != len(own) or any(c < o for c, o in zip(counts, own, strict=True)):
        raise ValueError(f"counts={counts}: need one per optimizer step, each >= {own}")
    steps = []
    for (a, b), count, need in zip(_parts(lengths, mini_batches), counts, own, strict=True):
        part = lengths[a:b]
        bins = balanced_bins(part, count)
        if any(sum(part[i] for i in bin_) > budget for bin_ in bins):
            bins = balanced_bins(part, need) + [()] * (count - need)
        steps.append([PackedMicroBatch(tuple(a + i for i in bin_)) for bin_ in bins])
    return steps
