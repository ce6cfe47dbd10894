"""Sleep that frees memory on CPU: what vLLM's CUDA sleep mode does, for its CPU build.

vLLM's CPU platform refuses sleep mode, so there ``LLM.sleep()`` frees nothing. This worker
extension releases the memory itself, in every worker of an engine (all TP ranks), through
``colocate.actors.cpu.page_release``: the pages go back to the OS at once, the virtual addresses
and every tensor stay valid, and nothing is re-allocated on wake. The engine actor reaches it
through its CPU sleep strategy (``colocate.actors.sleep.cpu_pages``).

What is released:

- **KV cache** (levels 1 and 2): every tensor of ``worker.model_runner.kv_caches``. Its
  contents are discarded by sleep anyway (the prefix cache is reset on wake).
- **Weights** (level 2 only): the pages of every model parameter
  (``model_runner.model.named_parameters()``), and the prepacked weights the CPU backend keeps
  outside torch parameters: each linear layer's ``cpu_linear`` callable holds them (a oneDNN
  matmul handler, or an SGL-packed tensor, depending on the CPU); dropping that callable frees
  them and leaves one that refuses to run. Level-2 weights are re-sent by a verified sync
  before the engine serves; the sync's reload re-packs every linear layer (and installs a new
  ``cpu_linear``), and writes every parameter. After a sync every released parameter must
  have been rewritten: one that was not raises ``WeightSyncError`` and the engine keeps
  refusing to serve.

On wake the released pages are faulted back in (zero-filled) before use, as CUDA wake-up maps
its memory back: the KV cache by ``cs_acquire("kv_cache")``, the parameters by
``cs_acquire("weights")``.

vLLM attributes relied on (vLLM 0.32 CPU): ``worker.model_runner.kv_caches``,
``worker.model_runner.model``, and a linear layer's ``cpu_linear`` with
``input_size_per_partition`` / ``output_size_per_partition`` / ``params_dtype``.
"""

from __future__ import annotations

import os

import torch

from colocate.actors.cpu.page_release import release_pages, storages, touch, trim_heap
from colocate.core.errors import ActorStateError

__all__ = ["CpuSleepExtension", "RELEASED_TAGS"]

RELEASED_TAGS = ("kv_cache", "weights")


def _released_linear(*args, **kwargs):
    raise ActorStateError(
        "this engine's linear weights were released by a level-2 sleep; a weight sync must "
        "reload them before it can run"
    )


def _process_rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


class CpuSleepExtension:
    """Mixed into vLLM's worker class (with the sync receiver); called by ``collective_rpc``."""

    def cs_release(self, level: int) -> dict:
        """Releases the KV cache (and at level 2 the weights) of this worker; what it freed.

        Returns:
            ``kv_bytes`` and ``weight_bytes``: the whole pages ``madvise`` dropped (KV cache;
            parameters), counted from the tensors' storages. ``packed_bytes``: measured, the
            RSS this worker returned by dropping the prepacked linear weights (RSS before the
            drop minus RSS after it and a ``malloc_trim``; a oneDNN handler's buffer is
            native and opaque to Python, so nothing reads its size directly).
            ``packed_bytes_estimate``: computed, ``n * k * element size`` over the dropped
            layers. ``trim_alone_bytes``: measured, the RSS a ``malloc_trim`` returned on its
            own just before the drop (free heap pages that predate it, kept out of
            ``packed_bytes``). ``kept_bytes`` (weights that stay resident, level 1), this
            worker's ``pid``, and its RSS before and after. The last call's dict is also
            kept for :meth:`cs_last_release`.
        """
        runner = self.model_runner
        rss_before = _process_rss()
        kv = [t for t in runner.kv_caches if isinstance(t, torch.Tensor)]
        out = {
            "kv_bytes": release_pages(kv),
            "weight_bytes": 0,
            "packed_bytes": 0,
            "packed_bytes_estimate": 0,
            "trim_alone_bytes": 0,
        }
        kept = 0
        if level == 2:
            model = runner.model
            params = dict(model.named_parameters())
            out["weight_bytes"] = release_pages(params.values())
            self._cs_released_params = {n for n, p in params.items() if p.numel() > 0}
            # A trim on its own first, measured: the free heap pages it returns were there
            # before any packed weight was dropped, and must not be counted as theirs.
            rss_untrimmed = _process_rss()
            trim_heap()
            rss_trimmed = _process_rss()
            for module in model.modules():
                if callable(getattr(module, "cpu_linear", None)) and module.cpu_linear is not (
                    _released_linear
                ):
                    size = _packed_bytes_estimate(module)
                    if size:
                        module.cpu_linear = _released_linear  # frees the packed weight
                        out["packed_bytes_estimate"] += size
            # The dropped handlers were freed at once (nothing else refers to them); their
            # memory can stay in the C heap's arenas until trimmed.
            trim_heap()
            out["trim_alone_bytes"] = rss_untrimmed - rss_trimmed
            out["packed_bytes"] = max(0, rss_trimmed - _process_rss())
        else:
            kept = sum(s.nbytes() for s in storages(runner.model.parameters()))
        out.update(
            kept_bytes=kept, pid=os.getpid(), rss_before=rss_before, rss_after=_process_rss()
        )
        self._cs_last_release = dict(out)
        return out

    def cs_last_release(self) -> dict | None:
        """This worker's dict from its last :meth:`cs_release` (None before any)."""
        last = getattr(self, "_cs_last_release", None)
        return None if last is None else dict(last)

    def cs_acquire(self, tag: str) -> int:
        """Faults the released pages of ``tag`` (``"kv_cache"`` or ``"weights"``) back in."""
        runner = self.model_runner
        if tag == "kv_cache":
            return touch(t for t in runner.kv_caches if isinstance(t, torch.Tensor))
        if tag == "weights":
            return touch(runner.model.parameters())
        raise ValueError(f"tag={tag!r}: must be one of {RELEASED_TAGS}")

    def cs_released_params(self) -> set[str]:
        """Names of the parameters a level-2 sleep released (a sync must rewrite each)."""
        return set(getattr(self, "_cs_released_params", set()))

    def cs_mark_reloaded(self) -> None:
        """Forgets the released set once a sync rewrote the weights."""
        self._cs_released_params = set()


def _packed_bytes_estimate(module: torch.nn.Module) -> int:
    """Estimated bytes of the prepacked weight a CPU linear layer's ``cpu_linear`` holds.

    Computed as ``n * k * element size`` from the layer's shape (the packed buffer itself is
    native; its padding is not seen); 0 where the layer holds none (its weight is still a
    parameter, whose pages were released with the others).
    """
    weight = getattr(module, "weight", None)
    n = getattr(module, "output_size_per_partition", None)
    k = getattr(module, "input_size_per_partition", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() != 0 or not (n and k):
        return 0  # the weight is still a parameter (not prepacked): its pages were released
    dtype = getattr(module, "params_dtype", weight.dtype)
    return int(n) * int(k) * torch.empty((), dtype=dtype).element_size()
