"""The DeepSpeed trainer backend: ZeRO 0-3 with DeepSpeed's AdamW, over our own group store."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

from typing_extensions import override

from colocate.actors.host_offload import offload_to_host, reload_to_device
from colocate.actors.trainer_backend import TrainerBackend, accumulate
from colocate.core.config import ZeroStage
from colocate.operations.memory_plan import REDUCE_BUCKET_ELEMENTS, SUB_GROUP_ELEMENTS

__all__ = ["DeepSpeedBackend", "deepspeed_config"]

# DeepSpeed state groups kept on the device while weights are sent (TRAIN -> SYNC).
_KEEP_FOR_SYNC = "lp_params"


def deepspeed_config(config) -> dict:
    """The DeepSpeed config a ``TrainerConfig`` stands for (``ds_config`` merged over it)."""
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "optimizer": {
            # DeepSpeed's own AdamW (FusedAdam, with a CPU build): ZeRO-3 offload_states
            # refuses a torch optimizer.
            "type": "AdamW",
            "params": {
                "lr": config.lr,
                "betas": list(config.betas),
                "weight_decay": config.weight_decay,
            },
        },
        "zero_optimization": {
            "stage": int(config.zero_stage),
            # DeepSpeed allocates a gradient reduce bucket of this many elements (training
            # dtype) for the whole run at ZeRO-3 and for each backward at ZeRO 1-2; its default
            # (5e8: 1 GB in bf16) is too large to leave implicit. ZeRO-3's step copies one
            # sub-group's gradients at a time (DeepSpeed's default size, made explicit). The
            # memory plan counts these same constants (``colocate.operations.memory_plan``, through
            # ``memory_check.settings_for``), and an override in ``ds_config`` reaches both.
            "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
            "sub_group_size": SUB_GROUP_ELEMENTS,
        },
        "bf16": {"enabled": config.dtype.value == "bfloat16"},
        "fp16": {"enabled": config.dtype.value == "float16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if config.zero_stage is ZeroStage.ZERO3:
        # Partition every parameter (small ones are otherwise kept whole on every rank).
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    _merge(ds_config, config.ds_config)
    return ds_config


class DeepSpeedBackend(TrainerBackend):
    """One rank of a DeepSpeed engine; offload through DeepSpeed's ``offload_states``."""

    _engine: Any = None
    _optimizer: Any = None
    _ds_config: dict | None = None

    @override
    def prepare(self, store: Any, master: tuple[str, int], timeout_s: float) -> dict[str, float]:
        """Imports DeepSpeed and the model's module and joins the trainer group.

        No device memory: the group's communicator (NCCL) is created lazily, by the first
        collective, and is counted in the memory plan's fixed cost per process anyway.
        """
        import torch.distributed as dist

        if dist.is_initialized():
            return {}
        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(0),
        )
        t0 = time.perf_counter()
        import deepspeed

        spent = super().prepare(store, master, timeout_s)
        spent["imports_s"] = time.perf_counter() - t0  # DeepSpeed's included
        t0 = time.perf_counter()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        # Our store (bound to one address) and our timeout, which bounds every trainer
        # collective (DeepSpeed's default: 10 min); DeepSpeed then adopts this default group.
        dist.init_process_group(
            backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout
        )
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        self._ds_config = deepspeed_config(self.config)
        spent["group_s"] = time.perf_counter() - t0
        return spent

    @override
    def start(self, store: Any, master: tuple[str, int], timeout_s: float) -> None:
        import deepspeed

        self.prepare(store, master, timeout_s)
        ds_config = self._ds_config
        model = self.build_model()
        self._engine, self._optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config
        )

    @override
    def load_default(self):
        """Under ZeRO-3, ``config.model`` built and loaded partitioned.

        See ``colocate.actors.partitioned_load``; a checkpoint that does not name the parameters one
        to one is loaded in full instead (``describe()["start_mode"]`` says which).
        """
        if self.config.zero_stage is not ZeroStage.ZERO3:
            return super().load_default()
        from colocate.actors.partitioned_load import (
            PartitionedLoadUnavailableError,
            load_partitioned,
        )

        try:
            model = load_partitioned(self.config.model, self._ds_config, self.rank)
        except PartitionedLoadUnavailableError as exc:
            self.start_mode = f"full model per rank, then partitioned ({exc})"
            return super().load_default()
        self.start_mode = "partitioned"
        return model

    @property
    @override
    def model(self) -> Any:
        return self._engine

    @property
    @override
    def module(self):
        return self._engine.module

    @property
    @override
    def optimizer(self) -> Any:
        return self._optimizer

    @override
    def step(self, loss_fn: Callable, micro: list, after_forward: Callable[[], None]) -> tuple:
        engine = self._engine
        # DeepSpeed's documented manual accumulation: the boundary is set before each
        # forward/backward, True on the last; one engine.step() then reduces (ZeRO) and steps.
        out = accumulate(
            loss_fn,
            engine,
            micro,
            after_forward,
            engine.backward,
            engine.set_gradient_accumulation_boundary,
        )
        engine.step()
        return out

    def _zero0(self) -> bool:
        return self.config.zero_stage is ZeroStage.ZERO0

    @override
    def offload(self, keep_params: bool) -> None:
        if self._zero0():  # offload_states needs a ZeRO optimizer
            offload_to_host(self.module, self._optimizer, self.device, keep_params)
            return
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

        include = [
            s for s in OffloadStateTypeEnum if not (keep_params and s.value == _KEEP_FOR_SYNC)
        ]
        self._engine.offload_states(include=include)

    @override
    def reload(self) -> None:
        if self._zero0():
            reload_to_device(self.module, self._optimizer, self.device)
        else:
            self._engine.reload_states()

    @override
    def weight_source(self):
        from weight_sync.sources import DeepSpeedSource

        return DeepSpeedSource(self._engine)

    @override
    def save(self, path: str, steps: int) -> None:
        # DeepSpeed also writes a file named "latest" naming the newest tag.
        self._engine.save_checkpoint(path, tag=f"step{steps}", client_state={"steps": steps})

    @override
    def load(self, path: str) -> int:
        _, client = self._engine.load_checkpoint(path)  # the tag in <path>/latest
        return int((client or {}).get("steps", 0))

    @override
    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self._engine = None
        self._optimizer = None


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
