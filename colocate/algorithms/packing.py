"""Packed sequences: whole sequences concatenated into one row, each attending only to itself.

A padded batch holds ``[B, T]`` tensors, right-padded to its longest row, so every forward pays
for ``B x T`` tokens. A packed micro-batch holds the same sequences' real tokens in one row
``[1, N]`` (``N`` = their summed lengths) with ``position_ids`` that restart at 0 at each
sequence. transformers builds a block-diagonal causal mask from restarting position ids when it
is given no 2-D attention mask and no cache (SDPA and eager: ``masking_utils``; flash-attention
varlen on CUDA where installed), so a sequence's outputs are those of its padded row.

How a padded batch's fields are packed (:func:`pack`):

- a tensor ``[B, T, ...]`` (a per-token field: ``input_ids``, ``completion_mask``,
  ``old_logprobs``, per-token ``advantages``): each row's first ``length`` tokens, concatenated;
- a tensor ``[B]`` (a per-sequence field: GRPO's ``advantages``, ``weight_version``): each
  row's value repeated over its tokens, so a loss broadcasts it per token as before;
- a list of ``B`` items: the packed rows' items; anything else as it is.

The packed batch drops ``attention_mask`` (a 2-D mask would turn transformers' per-sequence
mask off) and adds ``position_ids`` ``[1, N]`` and ``cu_seqlens`` ``[k + 1]`` (each sequence's
first token, flash-attention's layout, and the marker of a packed batch). Outputs go back to
padded rows with :func:`unpack`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "SequencePackingError",
    "PackedModel",
    "is_packed",
    "sequence_lengths",
    "pack",
    "unpack",
    "last_token_index",
    "forward_kwargs",
    "check_packing",
    "forward_packed",
]

#: The key whose presence marks a packed batch (each sequence's start offset, then ``N``).
CU_SEQLENS = "cu_seqlens"


class SequencePackingError(ValueError):
    """A batch or model that cannot be packed, or a forward that would mix packed sequences."""


class _PackedBatch(dict):
    """A packed batch: reading its (dropped) ``attention_mask`` says why there is none."""

    def __missing__(self, key: str) -> Any:
        if key == "attention_mask":
            raise KeyError(
                "attention_mask: a packed micro-batch has none (one row of whole sequences); "
                "fix: call the model with position_ids=batch['position_ids'] and no mask "
                "(colocate.algorithms.packing.forward_kwargs, or token_logprobs(model, "
                "batch['input_ids'], position_ids=batch['position_ids']))"
            )
        raise KeyError(key)


def is_packed(batch: dict) -> bool:
    """Whether ``batch`` is a packed micro-batch (it holds ``cu_seqlens``)."""
    return CU_SEQLENS in batch


def sequence_lengths(batch: dict) -> list[int]:
    """Each row's tokens, from ``attention_mask`` (rows must be right-padded).

    Raises:
        SequencePackingError: No ``attention_mask``, or a row whose mask is not ones then zeros.
    """
    mask = batch.get("attention_mask")
    if mask is None:
        raise SequencePackingError(
            "packing needs batch['attention_mask'] [B, T] (1 on each row's tokens); fix: add it"
        )
    mask = torch.as_tensor(mask).bool()
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    bad = (prefix != mask).any(1).nonzero().flatten()
    if len(bad):
        raise SequencePackingError(
            f"batch['attention_mask'] row {int(bad[0])} is not right-padded (ones, then "
            "zeros); fix: right-pad every row (make_grpo_batch does), or pack no batch"
        )
    return [int(n) for n in lengths]


def pack(batch: dict, rows: Sequence[int], lengths: Sequence[int] | None = None) -> dict:
    """Rows ``rows`` of a padded batch as one packed micro-batch (see the module docstring).

    Args:
        batch: A padded batch (one row per sequence, right-padded, with ``attention_mask``).
        rows: The rows to pack, in the order they are laid out (at least one).
        lengths: :func:`sequence_lengths` of ``batch`` if already known.

    Returns:
        The packed batch: every field packed, plus ``position_ids`` [1, N] and ``cu_seqlens``.
    """
    lengths = sequence_lengths(batch) if lengths is None else lengths
    if not rows:
        raise SequencePackingError("pack(rows=()): pack at least one row")
    b, width = len(lengths), int(torch.as_tensor(batch["attention_mask"]).shape[1])
    sizes = torch.tensor([lengths[r] for r in rows])
    index = torch.tensor(list(rows))
    out = _PackedBatch()
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (b, width):
            out[key] = torch.cat([value[r, : lengths[r]] for r in rows]).unsqueeze(0)
        elif isinstance(value, torch.Tensor) and value.dim() == 1 and len(value) == b:
            out[key] = value[index].repeat_interleave(sizes).unsqueeze(0)
        elif isinstance(value, (list, tuple)) and len(value) == b:
            out[key] = [value[r] for r in rows]
        else:
            out[key] = value
    out["position_ids"] = torch.cat([torch.arange(n) for n in sizes.tolist()]).unsqueeze(0)
    out[CU_SEQLENS] = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    return out


def unpack(values: torch.Tensor, packed: dict, width: int, fill: float = 0.0) -> torch.Tensor:
    """A packed output ``[1, N, ...]`` back to right-padded rows ``[k, width, ...]``.

    Row ``i`` is the ``i``-th packed sequence; positions past its length hold ``fill``.
    """
    cu = packed[CU_SEQLENS].tolist()
    flat = values.reshape(values.shape[1:]) if values.dim() >= 2 else values
    out = flat.new_full((len(cu) - 1, width, *flat.shape[1:]), fill)
    for i in range(len(cu) - 1):
        out[i, : cu[i + 1] - cu[i]] = flat[cu[i] : cu[i + 1]]
    return out


def last_token_index(packed: dict) -> torch.Tensor:
    """The position in the packed row of each sequence's last token ``[k]``."""
    return packed[CU_SEQLENS][1:] - 1


def forward_kwargs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> dict:
    """The keyword arguments of an HF forward over padded rows or one packed row.

    With ``position_ids`` (packed) the 2-D mask is left out and the cache turned off: only then
    does transformers build each sequence's own causal mask from the restarting positions.
    """
    if position_ids is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}


class PackedModel:
    """The model a loss function is given for a packed micro-batch: refuses a mixing call.

    A call without ``position_ids`` would attend across the packed sequences (one causal
    mask over the whole row): it raises :class:`SequencePackingError` instead. A 2-D all-ones mask
    passed beside them is dropped (see :func:`forward_kwargs`). Attributes are the model's.
    """

    def __init__(self, model: Any):
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward with ``position_ids``, no padding mask and no cache."""
        if kwargs.get("position_ids") is None:
            raise SequencePackingError(
                "a packed micro-batch's model was called without position_ids, so its "
                "sequences would attend to each other; fix: pass "
                "position_ids=batch['position_ids'] (colocate.algorithms.packing.forward_kwargs)"
            )
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and mask.dim() == 2 and not bool(mask.bool().all()):
            raise SequencePackingError("a packed micro-batch takes no padding mask; fix: pass none")
        kwargs["use_cache"] = False
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def check_packing(model: torch.nn.Module, where: str, vocab: int, atol: float) -> float:
    """Checks that ``model`` confines attention to each packed sequence; returns the gap.

    Three forwards of its body (``model.base_model``): sequences ``a`` then ``c`` packed,
    ``b`` then ``c`` packed (``b`` differs from ``a`` in every token), and ``c`` alone. ``c``'s
    hidden states must not depend on what was packed before it, and must equal its own
    forward's within ``atol``. Every rank of a ZeRO-3 group runs it together.

    Raises:
        SequencePackingError: Naming ``where`` and the model's class, with the gaps measured.
    """
    ids = lambda *xs: torch.tensor([list(xs)]) % vocab  # noqa: E731
    a, b, c = ids(3, 5, 7, 11), ids(13, 17, 19, 23), ids(29, 31, 37, 41, 43)
    body = model.base_model
    device = next(model.parameters()).device

    def hidden(*seqs: torch.Tensor) -> torch.Tensor:
        row = torch.cat(seqs, 1).to(device)
        pos = torch.cat([torch.arange(s.shape[1]) for s in seqs]).unsqueeze(0).to(device)
        out = body(**forward_kwargs(row, position_ids=pos))[0].float()
        return out[0, -c.shape[1] :]

    with torch.no_grad():
        after_a, after_b, alone = hidden(a, c), hidden(b, c), hidden(c)
    mixed = float((after_a - after_b).abs().max())
    gap = float((after_a - alone).abs().max())
    if mixed > atol or gap > atol:
        raise SequencePackingError(
            f"{where}: {type(model).__name__} does not confine attention to each packed "
            f"sequence (a sequence's hidden states move by {mixed:.3g} with the sequence packed "
            f"before it, and differ from its own forward by {gap:.3g}); fix: leave "
            "max_tokens_per_micro_batch unset (padded rows) for this model"
        )
    return gap


def _to(part: dict, device: torch.device | None) -> dict:
    if device is None:
        return part
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in part.items()}


def forward_packed(
    fn: Any,
    batch: dict,
    bins: Sequence[Sequence[int]],
    lengths: Sequence[int] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``fn(packed)`` over each bin of rows packed, answers back in the batch's row order.

    ``fn`` returns per-token outputs ``[1, N, ...]`` (unpacked to padded rows ``[B, T, ...]``,
    0 past each row's length) or one output per packed sequence ``[k, ...]``. An empty bin is
    a filler (a forward of the shortest row, its output dropped): it keeps a ZeRO-3 rank's
    collectives in step with its group's.
    """
    lengths = sequence_lengths(batch) if lengths is None else lengths
    width = int(torch.as_tensor(batch["attention_mask"]).shape[1])
    shortest = min(range(len(lengths)), key=lambda r: (lengths[r], r))
    order, parts = [], []
    for rows in bins:
        part = pack(batch, list(rows) or [shortest], lengths)
        out = fn(_to(part, device)).detach().cpu()
        if not rows:
            continue
        parts.append(unpack(out, part, width) if out.dim() >= 2 else out)
        order.extend(rows)
    if sorted(order) != list(range(len(lengths))):
        raise SequencePackingError(
            f"bins {list(bins)} do not cover the {len(lengths)} rows once each"
        )
    merged = torch.cat(parts)
    return merged[torch.tensor(order).argsort()]
