"""Where the trainer's weights come from: a plain module, or a DeepSpeed engine at ZeRO-0/1/2/3.

Names are HF checkpoint names (what vLLM's ``load_weights`` expects). Under ZeRO-3 each rank
holds a shard; :meth:`WeightSource.gathered` gathers one bucket's parameters at a time (a
collective every trainer rank must enter in the same order), never the whole model.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from typing_extensions import override

from weight_sync.buckets import TensorMeta

__all__ = ["WeightSource", "ModuleSource", "DeepSpeedSource", "source_for"]


class WeightSource(ABC):
    """The trainer-side view of the weights to send."""

    #: True when :meth:`gathered` is a collective that every trainer rank must enter.
    collective: bool = False

    @override
    @abstractmethod
    def metas(self, dtype: torch.dtype) -> list[TensorMeta]:
        """Every tensor to send, in a stable order, as the engine receives it (``dtype``)."""

    @override
    @abstractmethod
    @contextlib.contextmanager
    def gathered(self, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Full tensors for ``names`` while the context is open (gathered under ZeRO-3)."""


def _params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # named_parameters drops tied duplicates (e.g. lm_head tied to embed_tokens), which is
    # what vLLM expects: it ties them again on its side.
    return dict(module.named_parameters())


class ModuleSource(WeightSource):
    """A plain ``nn.Module`` whose parameters are whole on this process."""

    def __init__(self, module: torch.nn.Module):
        self._params = _params(module)

    @override
    def metas(self, dtype: torch.dtype) -> list[TensorMeta]:
        return [TensorMeta(n, tuple(p.shape), dtype) for n, p in self._params.items()]

    @override
    @contextlib.contextmanager
    def gathered(self, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        yield {n: self._params[n].detach() for n in names}


class DeepSpeedSource(WeightSource):
    """A DeepSpeed engine; ZeRO-3 parameters are gathered one bucket at a time."""

    def __init__(self, engine):
        self._params = _params(engine.module)
        self._zero3 = engine.zero_optimization_stage() == 3
        self.collective = self._zero3

    @override
    def metas(self, dtype: torch.dtype) -> list[TensorMeta]:
        return [
            TensorMeta(n, tuple(p.ds_shape) if self._zero3 else tuple(p.shape), dtype)
            for n, p in self._params.items()
        ]

    @override
    @contextlib.contextmanager
    def gathered(self, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        params = [self._params[n] for n in names]
        if not self._zero3:
            yield {n: p.detach() for n, p in zip(names, params, strict=True)}
            return
        import deepspeed

        # modifier_rank=None: read-only; the shards are released when the context closes.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield {n: p.detach() for n, p in zip(names, params, strict=True)}


def source_for(model) -> WeightSource:
    """A DeepSpeed engine gives a :class:`DeepSpeedSource`, anything else a module source."""
    if hasattr(model, "zero_optimization_stage") and hasattr(model, "module"):
        return DeepSpeedSource(model)
    return ModuleSource(model)
