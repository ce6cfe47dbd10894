"""The worker extension of the engine actor: the weight-sync receiver, CPU sleep, warm-up.

vLLM takes one ``worker_extension_cls`` and mixes it into its worker class in every worker
process; this class combines the receiver (``weight_sync.receiver``) with the CPU sleep
mechanism (``colocate.actors.cpu.cpu_sleep``). After a sync it checks that every parameter a level-2
sleep released was rewritten: a released parameter the sync did not cover would serve zeros.

Warm-up: the first generate that asks for log-probs compiles vLLM's ``torch.compile``'d
logprob gather (``batched_count_greater_than``, via the sampler's ``gather_logprobs``):
seconds, against a fraction of a second for a later generate (figures: ``docs/design.md``,
section 8a). Its batch dimension is symbolic, so compiling it once with a dummy batch of the
model's vocabulary compiles what every later call uses. ``ce_warm_up`` starts that in a
background thread of each worker right after the engine is built, so it overlaps the rest of
start-up (the trainers' start, the first sync); the first generate waits for it to finish.
"""

from __future__ import annotations

import threading
import time

from colocate.actors.cpu.amx import request_amx_tiles
from colocate.actors.cpu.cpu_sleep import CpuSleepExtension
from weight_sync.errors import WeightSyncError
from weight_sync.receiver import WeightSyncWorkerExtension

__all__ = ["EngineWorkerExtension", "EXTENSION_QUALNAME"]

# Every vLLM worker process imports this module (to resolve ``worker_extension_cls``) before
# its first kernel runs: the one point that covers them all, TP workers included. Without the
# request an AMX CPU traps in vLLM's bf16 attention (``colocate.actors.cpu.amx``).
request_amx_tiles()


class EngineWorkerExtension(WeightSyncWorkerExtension, CpuSleepExtension):
    """Receiver, CPU sleep and warm-up, mixed into each vLLM worker."""

    def ce_warm_up(self) -> bool:
        """Starts compiling the logprob gather in a background thread (see the module doc)."""
        self._ce_warm = {"error": None, "seconds": None}
        self._ce_thread = threading.Thread(target=self._ce_compile, name="warm-up", daemon=True)
        self._ce_thread.start()
        return True

    def _ce_compile(self) -> None:
        import torch
        from vllm.v1.sample.sampler import Sampler

        start = time.perf_counter()
        try:
            vocab = self.model_config.get_vocab_size()
            logprobs = torch.zeros(2, vocab, dtype=torch.float32, device=self.device)
            tokens = torch.zeros(2, dtype=torch.int64, device=self.device)
            Sampler.gather_logprobs(logprobs, 0, tokens)
        except Exception as exc:  # noqa: BLE001 - reported by ce_warm_up_wait; the first
            # generate then simply compiles it itself
            self._ce_warm["error"] = f"{type(exc).__name__}: {exc}"
        self._ce_warm["seconds"] = time.perf_counter() - start

    def ce_warm_up_wait(self, timeout_s: float) -> dict:
        """Waits (bounded) for the warm-up; its compile seconds and error, if any."""
        thread = getattr(self, "_ce_thread", None)
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                raise TimeoutError(f"warm-up compile still running after {timeout_s:g} s")
        return dict(getattr(self, "_ce_warm", {}))

    def ws_receive(self, request):
        """Receives and applies a sync (see the receiver), then clears the released set."""
        report = super().ws_receive(request)
        plan = self._ws_require().setup.plan
        written = {plan.packing.engine_name(m.name) for m in plan.metas}
        missing = sorted(self.cs_released_params() - written)
        if missing:
            raise WeightSyncError(
                f"parameter {missing[0]!r} (and {len(missing) - 1} more) was released by a "
                "level-2 sleep but the sync does not rewrite it; fix: sleep at level 1, or "
                "send every parameter of the engine's model"
            )
        self.cs_mark_reloaded()
        return report


#: The ``worker_extension_cls`` the engine actor gives vLLM.
EXTENSION_QUALNAME = f"{__name__}.{EngineWorkerExtension.__qualname__}"
