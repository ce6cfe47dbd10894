"""The trainer's weights, one gathered chunk at a time: fingerprints and an HF export.

Under ZeRO-3 a full parameter exists only while it is gathered. Gathering every parameter at
once (as ``GatheredParameters`` over the whole model would) makes each rank hold the full model
for the duration; here parameters are gathered in chunks of at most ``chunk_bytes`` (a single
larger tensor is a chunk of its own), and each chunk is fingerprinted, or cast and written as
one safetensors shard by rank 0, before the next is gathered. Every rank takes part in every
gather (they are collectives), in the same order.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["weight_chunks", "stream_fingerprints", "stream_export"]

_INDEX = "model.safetensors.index.json"


def weight_chunks(metas: list, chunk_bytes: int) -> list[list[str]]:
    """Names grouped in order into chunks of at most ``chunk_bytes`` (by each meta's bytes)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes={chunk_bytes}: must be > 0")
    chunks: list[list[str]] = []
    used = 0
    for m in metas:
        if not chunks or used + m.nbytes > chunk_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(m.name)
        used += m.nbytes
    return chunks


def _source_chunks(source, chunk_bytes: int) -> list[list[str]]:
    # Chunk by the stored (training) dtype: that is what a gather materialises.
    return weight_chunks(source.metas(torch.float32), chunk_bytes)


def _gathered(source, chunks: list[list[str]]) -> Iterator[dict[str, torch.Tensor]]:
    """Each chunk's full tensors, gathered (a collective on every rank) and released in turn."""
    for names in chunks:
        with source.gathered(names) as tensors:
            yield tensors


def stream_fingerprints(source, chunk_bytes: int) -> dict:
    """Fingerprints of every full parameter, as stored, one gathered chunk at a time."""
    from weight_sync.fingerprint import fingerprint

    out = {}
    for tensors in _gathered(source, _source_chunks(source, chunk_bytes)):
        out.update((n, fingerprint(t)) for n, t in tensors.items())
    return out


def stream_export(
    source, module, path: str, dtype: torch.dtype, chunk_bytes: int, write: bool
) -> int:
    """Writes the weights as sharded safetensors plus their index and the model's config.

    Steps, per chunk: gather; on the writing rank, cast to ``dtype`` on the host and save the
    shard ``model-<k>-of-<n>.safetensors``; release. Then (writing rank) the index,
    ``config.json`` and ``generation_config.json``. Names are the module's own
    (``named_parameters``), which HF and vLLM load back; a tied weight is saved once, under
    its first name.

    Args:
        source: The rank's ``weight_sync.WeightSource``.
        module: The HF model (its config and generation config are saved).
        path: The output directory (created).
        dtype: The saved dtype.
        chunk_bytes: Most bytes gathered at once (in the stored dtype).
        write: Whether this rank writes (rank 0); the others only join the gathers.

    Returns:
        Bytes written (0 on a rank that does not write).
    """
    from safetensors.torch import save_file

    out = Path(path)
    chunks = _source_chunks(source, chunk_bytes)
    if write:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("model*.safetensors"), out / _INDEX]:
            stale.unlink(missing_ok=True)  # an older export's shards must not be mixed in
    weight_map, total = {}, 0
    for k, tensors in enumerate(_gathered(source, chunks)):
        if not write:
            continue
        shard = f"model-{k + 1:05d}-of-{len(chunks):05d}.safetensors"
        state = {n: t.detach().to("cpu", dtype).contiguous() for n, t in tensors.items()}
        save_file(state, str(out / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in state.values())
        weight_map.update((n, shard) for n in state)
        del state
    if write:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        config = copy.deepcopy(module.config)
        config.dtype = dtype
        config.save_pretrained(out)
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(out)
    return total
