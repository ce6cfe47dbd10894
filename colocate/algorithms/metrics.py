"""How per-micro-batch, per-step and per-rank metrics combine into one figure.

A loss function's metrics are plain floats per micro-batch. They are combined three times: over
the micro-batches of an optimizer step (weighted by each one's share of the step's loss
tokens), over the optimizer steps of a train call, and over the ranks. A metric whose name ends
in ``_max`` (e.g. ``ratio_max``) is a maximum at every level, so the figure is the maximum over
every token seen; every other metric is a (weighted) mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["MAX_SUFFIX", "merge_metrics"]

#: Metrics named with this suffix combine by maximum, not by mean.
MAX_SUFFIX = "_max"


def merge_metrics(
    rows: Sequence[Mapping[str, float]], weights: Sequence[float] | None = None
) -> dict[str, float]:
    """Combines metric rows into one: maxima for ``*_max`` keys, weighted means otherwise.

    Args:
        rows: One mapping per micro-batch, optimizer step or rank; a key missing from a row
            counts as absent there (it neither lowers a maximum nor a mean's other terms).
        weights: One weight per row, summing to 1 (micro-batches weighted by their loss
            tokens); None weighs the rows equally.

    Returns:
        Every key of any row, combined.
    """
    if not rows:
        return {}
    if weights is None:
        weights = [1.0 / len(rows)] * len(rows)
    if len(weights) != len(rows):
        raise ValueError(f"merge_metrics: {len(rows)} rows but {len(weights)} weights")
    keys = sorted({k for r in rows for k in r})
    out = {}
    for key in keys:
        present = [(float(r[key]), w) for r, w in zip(rows, weights, strict=True) if key in r]
        if key.endswith(MAX_SUFFIX):  # a filler micro-batch (weight 0) repeats a real row
            out[key] = max([v for v, w in present if w > 0] or [v for v, _ in present])
        else:
            total = sum(w for _, w in present)
            out[key] = sum(v * w for v, w in present) / total if total else 0.0
    return out
