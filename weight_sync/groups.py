"""Which trainer rank feeds which engine worker, over which transport. Pure; no Ray.

Off CUDA every engine worker joins one gloo group fed by trainer rank 0. On CUDA a worker
that shares its GPU with a trainer rank is fed by that rank over CUDA IPC (NCCL refuses two
ranks on one GPU, and the bytes then never leave the GPU); every other worker joins one NCCL
group fed by trainer rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from placement import DeviceKind, Plan, TenantKind
from weight_sync.transport import Backend

__all__ = ["Receiver", "TransferGroup", "choose_backend", "plan_transfer_groups"]


def choose_backend(sender_bundle: int, receiver_bundle: int, device: DeviceKind) -> Backend:
    """Picks the transport for one sender/receiver pair from the placement.

    Same GPU on CUDA: CUDA IPC (NCCL refuses two ranks on one GPU). Different GPUs on CUDA:
    NCCL. Off CUDA: gloo, whatever the placement. ``device`` is what the placement probe
    found on the bundles, never the driver's own view.
    """
    if DeviceKind(device) is not DeviceKind.CUDA:
        return Backend.GLOO
    return Backend.CUDA_IPC if sender_bundle == receiver_bundle else Backend.NCCL


@dataclass(frozen=True, order=True)
class Receiver:
    """One engine worker: engine index and TP rank."""

    engine: int
    tp_rank: int


@dataclass(frozen=True)
class TransferGroup:
    """One sender and its receivers; receiver ``i`` has group rank ``i + 1``."""

    sender_rank: int
    backend: Backend
    receivers: tuple[Receiver, ...]

    @property
    def world_size(self) -> int:
        """Sender plus receivers."""
        return 1 + len(self.receivers)

    def rank_of(self, receiver: Receiver) -> int:
        """Group rank of ``receiver``."""
        return 1 + self.receivers.index(receiver)


def plan_transfer_groups(plan: Plan, device: DeviceKind) -> tuple[TransferGroup, ...]:
    """Groups every engine worker of ``plan`` under one sender and transport.

    ``device`` is the reservation's (what the placement probe found on the bundles).
    """
    trainer_on = {
        b.index: t.index for b in plan.bundles for t in b.tenants if t.kind is TenantKind.TRAINER
    }
    by_key: dict[tuple[int, Backend], list[Receiver]] = {}
    for e in range(plan.spec.engines):
        for tp_rank, bundle in enumerate(plan.engine_bundles(e)):
            local = trainer_on.get(bundle)
            sender = local if local is not None else 0
            sender_bundle = plan.trainer_bundle(sender)
            backend = choose_backend(sender_bundle, bundle, device)
            if backend is not Backend.CUDA_IPC:
                sender = 0  # one collective group, fed by rank 0
            by_key.setdefault((sender, backend), []).append(Receiver(e, tp_rank))
    return tuple(
        TransferGroup(sender, backend, tuple(sorted(receivers)))
        for (sender, backend), receivers in sorted(
            by_key.items(), key=lambda kv: (kv[0][0], kv[0][1].value)
        )
    )
