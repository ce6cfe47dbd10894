"""The worker extension of the engine actor: the weight-sync receiver and CPU sleep, in one class.

vLLM takes one ``worker_extension_cls`` and mixes it into its worker class in every worker
process; this class combines the receiver (``weight_sync.receiver``) with the CPU sleep
mechanism (``colocate.cpu_sleep``). After a sync it checks that every parameter a level-2
sleep released was rewritten: a released parameter the sync did not cover would serve zeros.
"""

from __future__ import annotations

from colocate.cpu_sleep import CpuSleepExtension
from weight_sync.buckets import fused_group_key
from weight_sync.errors import WeightSyncError
from weight_sync.receiver import WeightSyncWorkerExtension

__all__ = ["EngineWorkerExtension", "EXTENSION_QUALNAME"]


class EngineWorkerExtension(WeightSyncWorkerExtension, CpuSleepExtension):
    """Receiver plus CPU sleep, mixed into each vLLM worker."""

    def ws_receive(self, request):
        """Receives and applies a sync (see the receiver), then clears the released set."""
        report = super().ws_receive(request)
        plan = self._ws_require().setup.plan
        written = {fused_group_key(m.name, plan.fused_groups) for m in plan.metas}
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
