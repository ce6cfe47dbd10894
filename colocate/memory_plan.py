"""A static memory plan: the bytes each GPU holds in each phase, itemised, before launch.

:func:`plan_memory` is pure: from the model's shape and the run's settings it computes what a
GPU holds in each phase of the protocol, itemised per tenant (engine weights, KV cache,
CUDA-graph allowance, trainer params, grads, optimizer states, activations, sync buffers,
per-process fixed cost), for each kind of GPU: one shared by a trainer rank and an engine
worker (colocated), or one of a separate engine or trainer pool. :func:`check_plan` compares
it with each bundle's memory, as the placement probe reported it on the bundle's own node, and
refuses a plan that cannot fit, naming the phase, the GPU and the largest items. On CPU the
bundles of a node share its host memory, so the check there is per node, against host memory,
and every message and table says so. The coordinator runs the check right after the
reservation, before any actor starts.

``python -m colocate.memory_plan --model DIR --gpus N ...`` prints the table.

The trainer arithmetic (``P`` parameters, ``N`` trainer ranks; ``w`` bytes of the training
dtype; in bf16/fp16 DeepSpeed keeps fp32 master weights and fp32 gradient partitions beside
the low-precision ones, so ``m = 4`` and ``g = 4 + w``; in fp32 ``m = 0`` and ``g = 4``):

================  ======================  =====================  =====================
ZeRO stage        params                  grads                  optimizer (Adam)
================  ======================  =====================  =====================
0                 ``w P``                 ``g P``                ``(8 + m) P``
1                 ``w P``                 ``g P``                ``(8 + m) P / N``
2                 ``w P``                 ``g P / N``            ``(8 + m) P / N``
3                 ``w P / N``             ``g P / N``            ``(8 + m) P / N``
================  ======================  =====================  =====================

Activations are estimated per micro-batch as ``34 s b h`` bytes per layer (16-bit, after
Korthikanti et al., without their ``5 a s^2 b`` attention-score term: HF's default SDPA and
flash attention do not keep the scores; ``2 s b h`` per layer plus one layer with activation
checkpointing) plus the fp32 logits and their log-softmax (``8 s b V``); under ZeRO-3 the
largest layer's gathered parameters are held twice (prefetch). Validation and error against
measured figures: ``docs/memory-plan.md``.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from colocate.config import ConfigError

__all__ = [
    "Pool",
    "Where",
    "ModelShape",
    "MemorySettings",
    "MemoryItem",
    "GpuPhase",
    "MemoryPlan",
    "MemoryPlanError",
    "BundleMemory",
    "plan_memory",
    "check_plan",
    "model_shape",
]

GIB = 1 << 30
# Per-process memory outside any tensor, measured: on an H200 (docs/gpu-results.md) a trainer
# process used 1.80 GB outside torch's allocator (CUDA context 0.55 GB, NCCL's communicator
# 650 MiB, cuBLAS, lazily loaded kernels) and a bare CUDA context is 0.55 GB; on this
# project's CPU machine an engine actor's RSS was 0.78 GB in ROLLOUT (with the tiny model and
# 64 MiB of KV cache) and a ZeRO-3 trainer rank's 0.58 GB (docs/memory-plan.md). RSS counts
# shared library pages in every process: an upper-side figure.
FIXED = {
    (True, "engine"): int(0.55e9),
    (True, "trainer"): int(1.80e9),
    (False, "engine"): int(0.72e9),
    (False, "trainer"): int(0.58e9),
}
CUDA_GRAPHS_ALLOWANCE = 512 << 20  # vLLM's captured graphs (they stay resident across sleep)
# torch's caching allocator reserves more than it hands out. With expandable segments (what
# trainer actors get on CUDA) the H200 run reserved 6.96 GB at the step's peak for 5.36 GB of
# state: +30 %, activations of that step included. Fitted on that one run, not validated.
ALLOCATOR_SLACK = 0.30


class MemoryPlanError(ConfigError):
    """A plan that cannot fit: the message names the phase, the GPU and the largest items."""


class Pool(enum.Enum):
    """Which tenants a GPU carries."""

    SHARED = "shared"  # a trainer rank and an engine worker (colocated)
    ENGINE = "engine"  # engine workers only
    TRAINER = "trainer"  # a trainer rank only


class Where(enum.Enum):
    """Which tenant holds an item."""

    ENGINE = "engine"
    TRAINER = "trainer"


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model (from its config.json, or given directly)."""

    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    largest_layer_params: int

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token at 16 bits (keys and values of every layer)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


def model_shape(model_dir: str | Path) -> ModelShape:
    """The shape of the HF model in ``model_dir``, counted on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = [
        sum(p.numel() for p in module.parameters())
        for name, module in model.named_modules()
        if name.count(".") == 2 and ".layers." in f".{name}"
    ]
    heads = config.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        largest_layer_params=max([*layers, config.vocab_size * config.hidden_size]),
    )


@dataclass(frozen=True)
class MemorySettings:
    """The run's settings that decide memory.

    Attributes:
        trainer_ranks: Trainer world size (ZeRO shards over it).
        engine_tp: Tensor-parallel size of each engine (its weights split over TP ranks).
        zero_stage: DeepSpeed ZeRO stage.
        train_dtype_bytes: Bytes of the training dtype (4 fp32, 2 bf16).
        engine_dtype_bytes: Bytes of the engine dtype.
        sleep_level: 1 keeps a host copy of the engine's weights, 2 drops them.
        gpu_memory_utilization: vLLM's share of a GPU when ``kv_cache_bytes`` is None.
        kv_cache_bytes: The KV-cache size, if set.
        micro_batch: Sequences per micro-batch of a trainer rank.
        seq_len: Tokens per sequence.
        activation_checkpointing: Recompute activations in backward.
        bucket_bytes: Sync bucket size (two buffers on the sender; two on a receiver that
            does not map the sender's memory, i.e. all but CUDA IPC).
        cuda: Plan for CUDA devices, or for a CPU run against host memory.
        enforce_eager: No CUDA graphs.
    """

    trainer_ranks: int = 2
    engine_tp: int = 1
    zero_stage: int = 3
    train_dtype_bytes: int = 4
    engine_dtype_bytes: int = 2
    sleep_level: int = 1
    gpu_memory_utilization: float = 0.45
    kv_cache_bytes: int | None = None
    micro_batch: int = 1
    seq_len: int = 512
    activation_checkpointing: bool = False
    bucket_bytes: int = 512 << 20
    cuda: bool = True
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        for name in ("trainer_ranks", "engine_tp", "micro_batch", "seq_len", "bucket_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"MemorySettings.{name}={value!r}: must be an int >= 1; fix: pass a "
                    "positive count"
                )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"MemorySettings.zero_stage={self.zero_stage!r}: use 0, 1, 2 or 3")
        for name in ("train_dtype_bytes", "engine_dtype_bytes"):
            if getattr(self, name) not in (2, 4):
                raise ConfigError(
                    f"MemorySettings.{name}={getattr(self, name)!r}: use 2 (bf16/fp16) or 4 (fp32)"
                )
        if self.sleep_level not in (1, 2):
            raise ConfigError(f"MemorySettings.sleep_level={self.sleep_level!r}: use 1 or 2")
        if self.kv_cache_bytes is not None and (
            isinstance(self.kv_cache_bytes, bool)
            or not isinstance(self.kv_cache_bytes, int)
            or self.kv_cache_bytes < 1
        ):
            raise ConfigError(
                f"MemorySettings.kv_cache_bytes={self.kv_cache_bytes!r}: must be an int >= 1 "
                "or None; fix: pass a positive size, or None to size it from "
                "gpu_memory_utilization"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"MemorySettings.gpu_memory_utilization={self.gpu_memory_utilization!r}: "
                "must be in (0, 1]"
            )


@dataclass(frozen=True)
class MemoryItem:
    """One thing one tenant holds on one GPU."""

    where: Where
    name: str
    bytes: int


@dataclass(frozen=True)
class GpuPhase:
    """What one GPU of ``pool`` holds in ``phase``."""

    pool: Pool
    phase: str
    items: tuple[MemoryItem, ...]

    @property
    def total(self) -> int:
        """Bytes held."""
        return sum(i.bytes for i in self.items)

    def largest(self, n: int = 3) -> list[MemoryItem]:
        """The ``n`` largest items."""
        return sorted(self.items, key=lambda i: -i.bytes)[:n]


@dataclass(frozen=True)
class MemoryPlan:
    """Per pool and phase, what one GPU holds (every GPU of a pool holds the same)."""

    shape: ModelShape
    settings: MemorySettings
    capacity: int | None
    phases: tuple[GpuPhase, ...]

    def of(self, pool: Pool) -> list[GpuPhase]:
        """The phases of ``pool``."""
        return [p for p in self.phases if p.pool is pool]

    def peak(self, pool: Pool = Pool.SHARED) -> GpuPhase:
        """The phase of ``pool`` that needs the most."""
        return max(self.of(pool), key=lambda p: p.total)

    def table(self, pool: Pool = Pool.SHARED) -> str:
        """The plan of ``pool`` as a text table (GiB), one column per phase."""
        phases = self.of(pool)
        names = sorted({(i.where.value, i.name) for p in phases for i in p.items})
        head = f"{'item':38s}" + "".join(f"{p.phase:>10s}" for p in phases)
        rows = [head, "-" * len(head)]
        for where, name in names:
            cells = [
                sum(i.bytes for i in p.items if (i.where.value, i.name) == (where, name))
                for p in phases
            ]
            rows.append(f"{where + ': ' + name:38s}" + "".join(f"{c / GIB:10.3f}" for c in cells))
        rows.append(f"{'total':38s}" + "".join(f"{p.total / GIB:10.3f}" for p in phases))
        kind = "device memory per GPU" if self.settings.cuda else "host memory per bundle"
        return "\n".join(rows) + f"\n(GiB of {kind}; {pool.value} GPUs)"


def _trainer(shape: ModelShape, s: MemorySettings) -> dict[str, int]:
    p, n, w = shape.params, s.trainer_ranks, s.train_dtype_bytes
    mixed = w != 4
    params = w * p if s.zero_stage < 3 else w * p // n
    grads = (4 + (w if mixed else 0)) * p
    grads = grads if s.zero_stage < 2 else grads // n
    optim = (8 + (4 if mixed else 0)) * p
    optim = optim if s.zero_stage == 0 else optim // n
    b, t, h = s.micro_batch, s.seq_len, shape.hidden
    per_layer = 17 * w * t * b * h  # 34 s b h in 16-bit (Korthikanti et al.), twice in fp32
    if s.activation_checkpointing:
        acts = w * t * b * h * shape.layers + per_layer
    else:
        acts = per_layer * shape.layers
    acts += 8 * t * b * shape.vocab  # fp32 logits and their log-softmax
    return {
        "params": params,
        "grads": grads,
        "optimizer states": optim,
        "activations (estimate)": acts,
        "ZeRO-3 gathered layers": 2 * w * shape.largest_layer_params if s.zero_stage == 3 else 0,
        "allocator slack": int(ALLOCATOR_SLACK * (params + grads + optim)) if s.cuda else 0,
    }


def _kv(shape: ModelShape, s: MemorySettings, capacity: int | None, fixed: int) -> int:
    if s.kv_cache_bytes is not None:
        return s.kv_cache_bytes
    if capacity is None:
        return 0  # sized by vLLM from the device: only known with the capacity
    weights = s.engine_dtype_bytes * shape.params // s.engine_tp
    kv = int(s.gpu_memory_utilization * capacity) - weights - fixed
    if kv <= 0:
        raise MemoryPlanError(
            f"gpu_memory_utilization={s.gpu_memory_utilization} gives the engine "
            f"{s.gpu_memory_utilization * capacity / GIB:.2f} GiB, less than its weights "
            f"({weights / GIB:.2f} GiB) and fixed cost; fix: raise gpu_memory_utilization, "
            "a larger engine_tp, or set kv_cache_bytes"
        )
    return kv


def plan_memory(
    shape: ModelShape, settings: MemorySettings, capacity: int | None = None
) -> MemoryPlan:
    """The bytes one GPU holds in each phase, for each pool. Pure.

    Phases of a shared GPU: ``rollout`` (engine awake, trainer offloaded), ``train`` (engine
    asleep, trainer full), ``sync`` (engine weights without KV cache, trainer params and the
    sync buffers). A separate engine GPU has one phase, ``serve`` (it never sleeps; it receives
    while serving), a separate trainer GPU one, ``train`` (never offloaded; it sends from
    there). On CPU nothing leaves host memory when a tenant "offloads": the trainer's state is
    counted in every phase, and so are the engine's weights at sleep level 1.

    Args:
        shape: The model.
        settings: The run.
        capacity: One GPU's memory, needed to size a KV cache from ``gpu_memory_utilization``.
    """
    s, e, tr = settings, Where.ENGINE, Where.TRAINER
    fixed_e, fixed_t = FIXED[(s.cuda, "engine")], FIXED[(s.cuda, "trainer")]
    weights = MemoryItem(e, "weights", s.engine_dtype_bytes * shape.params // s.engine_tp)
    kv = MemoryItem(e, "KV cache", _kv(shape, s, capacity, fixed_e))
    graphs = MemoryItem(e, "CUDA graphs", CUDA_GRAPHS_ALLOWANCE * (s.cuda and not s.enforce_eager))
    recv = MemoryItem(e, "receive buffers", 2 * s.bucket_bytes)
    send = MemoryItem(tr, "send buffers", 2 * s.bucket_bytes)
    t = {k: MemoryItem(tr, k, v) for k, v in _trainer(shape, s).items()}
    state = [t["params"], t["grads"], t["optimizer states"]]
    step = [*state, t["activations (estimate)"], t["ZeRO-3 gathered layers"], t["allocator slack"]]
    engine_fixed, trainer_fixed = (
        MemoryItem(e, "fixed per process", fixed_e),
        MemoryItem(tr, "fixed per process", fixed_t),
    )
    asleep = [graphs] + ([] if s.cuda or s.sleep_level == 2 else [weights])
    offloaded = [] if s.cuda else state
    shared = {
        "rollout": [weights, kv, graphs, *offloaded],
        "train": [*asleep, *step],
        # CUDA IPC maps the sender's buffers; gloo (CPU) receives into the engine's own
        "sync": [weights, graphs, *([] if s.cuda else [recv]), t["params"], send]
        + ([] if s.cuda else state[1:])
        + [t["ZeRO-3 gathered layers"]],
    }
    pools = {
        Pool.SHARED: (shared, [engine_fixed, trainer_fixed]),
        Pool.ENGINE: ({"serve": [weights, kv, graphs, recv]}, [engine_fixed]),
        Pool.TRAINER: ({"train": [*step, send]}, [trainer_fixed]),
    }
    phases = tuple(
        GpuPhase(pool, name, tuple(i for i in (*items, *fixed) if i.bytes))
        for pool, (by_phase, fixed) in pools.items()
        for name, items in by_phase.items()
    )
    return MemoryPlan(shape, s, capacity, phases)


@dataclass(frozen=True)
class BundleMemory:
    """One bundle as the check sees it.

    Attributes:
        label: How messages name it (``"bundle 0 (gpu 0 of 10.0.0.5, NVIDIA H200)"``).
        pool: Which tenants it carries.
        capacity: Its device memory on CUDA; on CPU its node's host memory (shared).
        node: The node it is on (CPU bundles of one node are checked together).
    """

    label: str
    pool: Pool
    capacity: int
    node: str = ""


def check_plan(plan: MemoryPlan, bundles: Sequence[BundleMemory]) -> None:
    """Refuses a plan that does not fit on every bundle (CUDA) or every node (CPU).

    Raises:
        MemoryPlanError: Names the phase, the GPU (or node), what is needed, what there is and
            the largest items.
    """
    fix = (
        "fix: more GPUs (ZeRO shards over them), a higher ZeRO stage, a larger engine TP, "
        "activation checkpointing, a smaller micro-batch, KV cache or gpu_memory_utilization, "
        "or smaller sync buckets"
    )

    def refuse(phase: GpuPhase, need: int, where: str, cap: int, kind: str) -> None:
        top = ", ".join(
            f"{i.where.value} {i.name} {i.bytes / GIB:.2f} GiB" for i in phase.largest()
        )
        raise MemoryPlanError(
            f"phase {phase.phase!r} needs {need / GIB:.2f} GiB on {where}, which has "
            f"{cap / GIB:.2f} GiB of {kind}; largest items per GPU: {top}; {fix}"
        )

    if plan.settings.cuda:
        for b in bundles:
            for phase in plan.of(b.pool):
                if phase.total > b.capacity:
                    refuse(phase, phase.total, b.label, b.capacity, "device memory")
        return
    by_node: dict[str, list[BundleMemory]] = defaultdict(list)
    for b in bundles:
        by_node[b.node].append(b)
    for node, members in by_node.items():
        cap = min(b.capacity for b in members)
        # Shared GPUs change phase together; a separate pool's GPU is in its one phase always.
        names = (
            [p.phase for p in plan.of(Pool.SHARED)]
            if any(b.pool is Pool.SHARED for b in members)
            else ["steady"]
        )
        for name in names:
            parts = []
            for b in members:
                own = plan.of(b.pool)
                parts.append(next((p for p in own if p.phase == name), max(own, key=_total)))
            need = sum(p.total for p in parts)
            if need > cap:
                where = f"node {node or '?'} ({len(members)} bundles share its host memory)"
                refuse(max(parts, key=_total), need, where, cap, "host memory (CPU run)")


def _total(phase: GpuPhase) -> int:
    return phase.total


if __name__ == "__main__":
    from colocate.memory_plan_cli import main

    raise SystemExit(main())
