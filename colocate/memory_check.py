"""The coordinator's pre-launch memory check: its configs and reservation, planned and checked.

:func:`settings_for` turns the run's configs into :class:`~colocate.memory_plan.MemorySettings`
(pure); :func:`bundles_of` reads each bundle's memory from the reservation (the placement
probe ran on the bundle's own node); :func:`check_run` plans and refuses what cannot fit,
before any actor starts. A train step's micro-batch is not known before the first batch, so
the check plans one sequence of ``max_model_len`` tokens: it refuses runs that cannot train
even that; larger batches are planned with ``python -m colocate.memory_plan``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from colocate.config import DType, EngineConfig, SyncConfig, TrainerConfig
from colocate.deepspeed_backend import deepspeed_config
from colocate.memory_plan import (
    BundleMemory,
    MemoryPlan,
    MemorySettings,
    Pool,
    check_plan,
    model_shape,
    plan_memory,
)
from placement import DeviceKind, Plan, TenantKind
from weight_sync.buckets import default_bucket_bytes

if TYPE_CHECKING:
    from placement import Reservation

__all__ = ["settings_for", "bundles_of", "check_run"]

_BYTES = {DType.FLOAT32: 4, DType.BFLOAT16: 2, DType.FLOAT16: 2}


def settings_for(
    engine: EngineConfig,
    trainer: TrainerConfig,
    sync: SyncConfig,
    plan: Plan,
    device: DeviceKind,
    sleep_level: int,
) -> MemorySettings:
    """The memory settings of a run. Pure."""
    cuda = device is DeviceKind.CUDA
    # The buckets the backend gives DeepSpeed, ds_config overrides included.
    zero = deepspeed_config(trainer)["zero_optimization"]
    return MemorySettings(
        trainer_ranks=plan.spec.trainer_world_size,
        engine_tp=plan.spec.engine_tp,
        zero_stage=int(trainer.zero_stage) if trainer.deepspeed else 0,
        # the plain-torch backend trains in fp32 whatever the config's dtype
        train_dtype_bytes=_BYTES[trainer.dtype] if trainer.deepspeed else 4,
        engine_dtype_bytes=_BYTES[engine.dtype],
        sleep_level=sleep_level,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        kv_cache_bytes=engine.kv_cache_bytes,
        micro_batch=1,
        seq_len=engine.max_model_len,
        bucket_bytes=sync.bucket_bytes or default_bucket_bytes(device),
        reduce_bucket_elements=int(zero["reduce_bucket_size"]),
        sub_group_elements=int(zero["sub_group_size"]),
        cuda=cuda,
        enforce_eager=engine.enforce_eager if engine.enforce_eager is not None else not cuda,
    )


def bundles_of(plan: Plan, reservation: Reservation) -> list[BundleMemory]:
    """Each bundle's pool and memory, from the placement probe's report."""
    out = []
    for slot in plan.bundles:
        kinds = {t.kind for t in slot.tenants}
        pool = (
            Pool.SHARED
            if kinds == {TenantKind.ENGINE, TenantKind.TRAINER}
            else Pool.ENGINE
            if kinds == {TenantKind.ENGINE}
            else Pool.TRAINER
        )
        loc = reservation.location(slot.index)
        acc = loc.accelerator
        label = f"bundle {slot.index} (gpu {loc.gpu_id} of {loc.node_address}, {acc.name})"
        out.append(BundleMemory(label, pool, acc.memory_bytes, loc.node_id))
    return out


def check_run(
    engine: EngineConfig,
    trainer: TrainerConfig,
    sync: SyncConfig,
    plan: Plan,
    reservation: Reservation,
    sleep_level: int,
) -> MemoryPlan:
    """Plans the run on the reserved bundles and refuses it if it cannot fit.

    Raises:
        MemoryPlanError: A phase does not fit on a GPU (CUDA) or a node's host memory (CPU).
    """
    # A probe that could not read a bundle's memory reports 0: that bundle is not checked.
    bundles = [b for b in bundles_of(plan, reservation) if b.capacity > 0]
    settings = settings_for(engine, trainer, sync, plan, reservation.device, sleep_level)
    capacity = min(b.capacity for b in bundles) if bundles else None
    shape = model_shape(engine.model)
    memory = plan_memory(shape, settings, capacity if engine.kv_cache_bytes is None else None)
    check_plan(memory, bundles)
    return memory
