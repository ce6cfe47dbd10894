"""Moving a plain torch model's training state between the device and (pinned) host memory.

Used by the plain-torch backend and by DeepSpeed at ZeRO-0 (whose ``offload_states`` does not
apply). On a CPU machine everything already is host memory: nothing moves.
"""

from __future__ import annotations

import torch

__all__ = ["offload_to_host", "reload_to_device"]


def offload_to_host(
    module: torch.nn.Module, optimizer, device: torch.device, keep_params: bool
) -> None:
    """Drops grads, moves optimizer states (and params unless ``keep_params``) to pinned host."""
    if device.type != "cuda":
        return  # already on the host: nothing to release
    for p in module.parameters():
        if p.grad is not None:
            p.grad = None  # grads are recomputed every step: drop rather than copy
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.is_cuda:
                state[k] = v.to("cpu", non_blocking=True).pin_memory()
    if not keep_params:
        for p in module.parameters():
            p.data = p.data.to("cpu").pin_memory()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def reload_to_device(module: torch.nn.Module, optimizer, device: torch.device) -> None:
    """Moves params and optimizer states back to ``device``."""
    if device.type != "cuda":
        return
    for p in module.parameters():
        p.data = p.data.to(device, non_blocking=True)
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.to(device, non_blocking=True)
    torch.cuda.synchronize()
