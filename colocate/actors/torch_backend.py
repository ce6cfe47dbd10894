"""The plain-torch trainer backend: one rank, torch AdamW, offload to pinned host memory."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import override

from colocate.actors.host_offload import offload_to_host, reload_to_device
from colocate.actors.trainer_backend import TrainerBackend, accumulate

__all__ = ["TorchBackend"]


class TorchBackend(TrainerBackend):
    """A whole model on one process, stepped by ``torch.optim.AdamW``."""

    _module: torch.nn.Module | None = None
    _optimizer: torch.optim.Optimizer | None = None

    @override
    def start(self, store: Any, master: tuple[str, int], timeout_s: float) -> None:
        if self.world_size != 1:
            raise ValueError(
                f"TrainerConfig.deepspeed=False supports one trainer rank, got world size "
                f"{self.world_size}; fix: use deepspeed=True or trainer_world_size=1"
            )
        cfg = self.config
        self._module = self.build_model().to(self.device)
        self._optimizer = torch.optim.AdamW(
            self._module.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )

    @property
    @override
    def model(self) -> torch.nn.Module:
        return self._module

    @property
    @override
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    @override
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @override
    def step(self, loss_fn: Callable, micro: list, after_forward: Callable[[], None]) -> tuple:
        self._optimizer.zero_grad(set_to_none=True)
        out = accumulate(loss_fn, self._module, micro, after_forward, torch.Tensor.backward)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._module.parameters(), self.config.grad_clip)
        self._optimizer.step()
        return out

    @override
    def offload(self, keep_params: bool) -> None:
        offload_to_host(self._module, self._optimizer, self.device, keep_params)

    @override
    def reload(self) -> None:
        reload_to_device(self._module, self._optimizer, self.device)

    @override
    def weight_source(self):
        from weight_sync.sources import ModuleSource

        return ModuleSource(self._module)

    @override
    def save(self, path: str, steps: int) -> None:
        os.makedirs(path, exist_ok=True)
        state = {
            "model": self._module.state_dict(),
            "optimizer": self._optimizer.state_dict(),
            "steps": steps,
        }
        torch.save(state, os.path.join(path, "trainer.pt"))

    @override
    def load(self, path: str) -> int:
        state = torch.load(os.path.join(path, "trainer.pt"), map_location=self.device)
        self._module.load_state_dict(state["model"])
        self._optimizer.load_state_dict(state["optimizer"])
        return int(state["steps"])

    @override
    def shutdown(self) -> None:
        self._module = None
        self._optimizer = None
