"""The factory: building either side of a transport (which one a pair uses: ``groups``).

The interfaces live in ``weight_sync.transport``; each implementation in its own module
(``collective``: gloo/NCCL, ``cuda_ipc``); only this module knows all of them.
"""

from __future__ import annotations

import torch

from weight_sync.collective import CollectiveReceiver, CollectiveSender
from weight_sync.cuda_ipc import IpcReceiver, IpcSender
from weight_sync.transport import Backend, ReceiverTransport, Rendezvous, SenderTransport

__all__ = ["make_sender", "make_receiver"]


def make_sender(
    rdv: Rendezvous, store, buffers: tuple[torch.Tensor, ...], device: torch.device
) -> SenderTransport:
    """Builds the sending side for ``rdv`` (rank 0 of the group) over the sender's own store.

    Must run concurrently with :func:`make_receiver` on every receiver: collective groups
    connect all members at construction.
    """
    if rdv.backend is Backend.CUDA_IPC:
        return IpcSender(rdv, store, buffers)
    return CollectiveSender(rdv, store, device)


def make_receiver(
    rdv: Rendezvous, rank: int, buffer_bytes: int, device: torch.device
) -> ReceiverTransport:
    """Builds the receiving side for group rank ``rank`` (>= 1) of ``rdv``."""
    if rdv.backend is Backend.CUDA_IPC:
        return IpcReceiver(rdv, rank, device)
    return CollectiveReceiver(rdv, rank, buffer_bytes, device)
