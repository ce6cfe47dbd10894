"""The coordinator's pre-launch memory check: its configs and reservation, planned and checked.

:func:`settings_for` turns the run's configs into
:class:`~colocate.operations.memory_plan.MemorySettings`
(pure); :func:`bundles_of` reads each bundle's memory from the reservation (the placement
probe ran on the bundle's own node); :func:`role_loads` asks each role's actor class what a
rank holds (``RoleActor.footprint``, in the driver) and where and when it holds it (the
placement plan's bundles, the role's resident phases); :func:`check_run` plans and refuses
what cannot fit, before any actor starts. A train step's micro-batch is not known before
the first batch, so the check plans one sequence of ``max_model_len`` tokens: it refuses runs
that cannot train even that; larger batches are planned with ``python -m
colocate.operations.memory_plan``. With a token budget (``max_tokens_per_micro_batch``) a
micro-batch is known: one packed row of the budget's tokens, and that is what is planned. A
role's forward is planned at its own micro-batch (rows of ``max_model_len`` tokens, or one
packed row of its own budget).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from colocate.actors.deepspeed_backend import deepspeed_config
from colocate.core.config import DType, EngineConfig, SyncConfig, TrainerConfig
from colocate.operations.memory_plan import (
    BundleMemory,
    MemoryPlan,
    MemorySettings,
    ModelShape,
    Pool,
    RoleFootprint,
    RoleLoad,
    check_plan,
    model_shape,
    plan_memory,
)
from placement import DeviceKind, Plan, TenantKind
from weight_sync.buckets import default_bucket_bytes

if TYPE_CHECKING:
    from colocate.roles.base import Role
    from placement import Reservation

__all__ = [
    "settings_for",
    "bundles_of",
    "role_loads",
    "trainer_footprint",
    "sdpa_mask",
    "check_run",
]

_BYTES = {DType.FLOAT32: 4, DType.BFLOAT16: 2, DType.FLOAT16: 2}


def _zero(trainer: TrainerConfig) -> tuple[int, int, int, int]:
    """ZeRO stage, training dtype bytes, reduce bucket and sub-group of ``trainer``'s backend."""
    # The buckets the backend gives DeepSpeed, ds_config overrides included.
    zero = deepspeed_config(trainer)["zero_optimization"]
    return (
        int(trainer.zero_stage) if trainer.deepspeed else 0,
        # the plain-torch backend trains in fp32 whatever the config's dtype
        _BYTES[trainer.dtype] if trainer.deepspeed else 4,
        int(zero["reduce_bucket_size"]),
        int(zero["sub_group_size"]),
    )


def trainer_footprint(
    trainer: TrainerConfig, shape: ModelShape, outputs: int | None = None
) -> RoleFootprint:
    """A trainer-like role's footprint (the critic's) from its own :class:`TrainerConfig`.

    Its ZeRO stage, dtype and DeepSpeed buckets as its backend builds them, its micro-batch
    (one row when unset, as the policy's check plans; one packed row with a token budget) and
    its activation checkpointing.
    """
    stage, w, reduce, sub_group = _zero(trainer)
    return RoleFootprint.trainer(
        shape,
        stage,
        w,
        trainer.micro_batch_size or 1,
        outputs,
        activation_checkpointing=trainer.activation_checkpointing,
        reduce_bucket_elements=reduce,
        sub_group_elements=sub_group,
        max_tokens_per_micro_batch=trainer.max_tokens_per_micro_batch,
    )


def sdpa_mask(cuda: bool) -> bool:
    """Whether a packed row's attention goes through SDPA with a materialised mask.

    On CUDA the trainer takes flash-attention's varlen kernel (no mask) where the package is
    installed; this looks for it in the driver's environment, assuming the actors run in the
    same one.
    """
    return not (cuda and importlib.util.find_spec("flash_attn") is not None)


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
    stage, w, reduce, sub_group = _zero(trainer)
    return MemorySettings(
        trainer_ranks=plan.spec.trainer_world_size,
        engine_tp=plan.spec.engine_tp,
        zero_stage=stage,
        train_dtype_bytes=w,
        engine_dtype_bytes=_BYTES[engine.dtype],
        sleep_level=sleep_level,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        kv_cache_bytes=engine.kv_cache_bytes,
        micro_batch=1,
        seq_len=engine.max_model_len,
        max_tokens_per_micro_batch=trainer.max_tokens_per_micro_batch,
        sdpa_mask=sdpa_mask(cuda),
        bucket_bytes=sync.bucket_bytes or default_bucket_bytes(device),
        reduce_bucket_elements=reduce,
        sub_group_elements=sub_group,
        cuda=cuda,
        enforce_eager=engine.enforce_eager if engine.enforce_eager is not None else not cuda,
    )


def bundles_of(plan: Plan, reservation: Reservation) -> list[BundleMemory]:
    """Each bundle's pool and memory, from the placement probe's report."""
    out = []
    for slot in plan.bundles:
        # A role beside a trainer rank or an engine does not change which pool the GPU is of.
        kinds = {t.kind for t in slot.tenants} - {TenantKind.ROLE}
        roles = tuple(sorted(t.role for t in slot.tenants if t.kind is TenantKind.ROLE))
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
        out.append(BundleMemory(label, pool, acc.memory_bytes, loc.node_id, roles))
    return out


def role_loads(roles: Sequence[Role], plan: Plan) -> list[RoleLoad]:
    """Each role as the memory plan takes it. Runs in the driver; starts nothing.

    A role whose actor class is not a :class:`~colocate.roles.base.RoleActor` declares nothing:
    it is planned as unknown (listed as not counted).
    """
    from colocate.roles.base import RoleActor

    out = []
    for role in roles:
        if issubclass(role.actor, RoleActor):
            footprint = role.actor.footprint(role.config)
        else:
            footprint = RoleFootprint.unknown()
        if not isinstance(footprint, RoleFootprint):
            raise TypeError(
                f"{role.actor.__name__}.footprint returned {footprint!r}; fix: return a "
                "colocate.operations.memory_plan.RoleFootprint (e.g. RoleFootprint.unknown())"
            )
        phases = frozenset(p.value for p in role.phases)
        out.append(RoleLoad(role.name, footprint, phases, len(plan.role_bundles(role.name))))
    return out


def check_run(
    engine: EngineConfig,
    trainer: TrainerConfig,
    sync: SyncConfig,
    plan: Plan,
    reservation: Reservation,
    sleep_level: int,
    roles: Sequence[Role] = (),
) -> MemoryPlan:
    """Plans the run (its roles included) on the reserved bundles; refuses what cannot fit.

    A role whose size is unknown is planned with its process's fixed cost only: a warning
    names it, and the plan's table says it is not counted.

    Raises:
        MemoryPlanError: A phase does not fit on a GPU (CUDA) or a node's host memory (CPU).
    """
    # A probe that could not read a bundle's memory reports 0: that bundle is not checked.
    bundles = [b for b in bundles_of(plan, reservation) if b.capacity > 0]
    settings = settings_for(engine, trainer, sync, plan, reservation.device, sleep_level)
    capacity = min(b.capacity for b in bundles) if bundles else None
    shape = model_shape(engine.model)
    loads = role_loads(roles, plan)
    memory = plan_memory(
        shape, settings, capacity if engine.kv_cache_bytes is None else None, loads
    )
    if memory.not_counted:
        warnings.warn(
            f"memory plan: roles {list(memory.not_counted)} declare no size, so their models "
            "are not counted (only their processes' fixed cost); fix: override "
            "RoleActor.footprint in their actor classes",
            stacklevel=2,
        )
    check_plan(memory, bundles)
    return memory
