"""A static memory plan: the bytes each GPU holds in each phase, itemised, before launch.

:func:`plan_memory` is pure: from the model's shape and the run's settings it computes what a
GPU holds in each phase of the protocol, itemised per tenant (engine weights, KV cache,
CUDA-graph allowance, trainer params, grads, optimizer states, activations, sync buffers,
per-process fixed cost), for each kind of GPU: one shared by a trainer rank and an engine
worker (colocated), or one of a separate engine or trainer pool. The roles of an RLHF pipeline
(reference, reward model, critic, a user's tenant: ``colocate.roles.base``) are counted on the GPUs
they sit on, in the phases they are resident in, from a :class:`RoleFootprint` each declares
without starting (:class:`RoleKind`: frozen forward-only, trainer-like, a declared figure, or
unknown, which the plan lists as not counted; their rows: ``docs/memory-plan.md``, Roles).
:func:`check_plan` compares it with each bundle's memory, as the placement probe reported it
on the bundle's own node, and refuses a plan that cannot fit, naming the phase, the GPU and
the largest items. On CPU the bundles of a node share its host memory, so the check there is
per node, against host memory, and every message and table says so. The coordinator runs the
check right after the reservation, before any actor starts.

``python -m colocate.operations.memory_plan_cli --model DIR --gpus N ...`` prints the table.

The trainer arithmetic (``P`` parameters, ``N`` trainer ranks; ``w`` bytes of the training
dtype; ``B`` = :data:`REDUCE_BUCKET_ELEMENTS`, ``S`` = :data:`SUB_GROUP_ELEMENTS`, both set in
the DeepSpeed config by ``colocate.actors.deepspeed_backend``; ``g = 4 + w`` in bf16/fp16, ``4`` in
fp32):

=====  =========  ===========  ==================  ============  =========================
ZeRO   params     grads        master + Adam       reduce        grads, copies in the step
=====  =========  ===========  ==================  ============  =========================
0      ``w P``    ``g P``      ``(8 + m0) P``      --            --
1      ``w P``    ``g P``      ``12 P / N``        ``w B`` (b)   --
2      ``w P``    ``g P / N``  ``12 P / N``        ``w B`` (b)   --
3      ``w P/N``  ``w P / N``  ``12 P / N``        ``w B``       ``g min(P / N, S)``
=====  =========  ===========  ==================  ============  =========================

``m0 = 4`` in bf16/fp16 (fp32 master weights), ``0`` in fp32 (Adam steps the model itself).
ZeRO 1-3 keep their own fp32 master partition in every dtype (``12 P / N``: master, exp_avg,
exp_avg_sq). At ZeRO-3 the gradient partitions (``w P / N``) and the reduce bucket (``w B``)
stay allocated between steps; inside ``step()`` each optimizer sub-group's gradients are
flattened (``w``) and cast to fp32 (``4``, the same tensor in fp32), then released
(``_release_sub_group``): that transient is the last column, counted in ``train`` only.
(b): at ZeRO 1-2 the reduce bucket exists during the backward only. The ZeRO-3 row is measured
(after a step and at the peak of ``step()``, two model sizes, bf16 and fp32, world size 1:
``tests/colocate/test_memory_plan.py``); the ZeRO 0-2 rows are not validated (measured
figures and their errors in ``docs/memory-plan.md``).

Activations are estimated per micro-batch as ``34 s b h`` bytes per layer (16-bit, after
Korthikanti et al., without their ``5 a s^2 b`` attention-score term: HF's default SDPA and
flash attention do not keep the scores; ``2 s b h`` per layer plus one layer with activation
checkpointing) plus the fp32 logits and their log-softmax (``8 s b V``); under ZeRO-3 the
largest layer's gathered parameters are held twice (prefetch). Validation and error against
measured figures: ``docs/memory-plan.md``.

A micro-batch is ``b`` padded rows of ``s`` tokens (``micro_batch`` x ``seq_len``), or, with a
token budget (``max_tokens_per_micro_batch``), one packed row of whole sequences: ``b = 1``,
``s`` = the budget, whatever the sequences' lengths. A packed row adds what padded rows of the
same tokens do not hold: its attention mask. Transformers builds the block-diagonal causal mask
of a packed row for SDPA (``s x s`` booleans), and torch converts it to the compute dtype in
every layer's attention and keeps that copy for the backward: ``w s^2`` per layer with grads
(one layer's and the boolean mask with activation checkpointing, and in a forward without
grads); the fused kernels SDPA picks (flash on CPU, memory-efficient on CUDA) do not keep the
scores, so the ``5 a s^2 b`` term stays out as for padded rows. Flash-attention's varlen kernel
takes no mask (``MemorySettings.sdpa_mask=False``).
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from colocate.core.config import ConfigError

__all__ = [
    "Pool",
    "Where",
    "ModelHead",
    "RoleKind",
    "RoleFootprint",
    "RoleLoad",
    "RoleRows",
    "LOOP_PHASES",
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
    "REDUCE_BUCKET_ELEMENTS",
    "SUB_GROUP_ELEMENTS",
]

GIB = 1 << 30
#: The phases of the loop, in the order a step visits them (a role's residency is among them).
LOOP_PHASES = ("rollout", "score", "train", "sync")
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
    # A role's rank that does not train (reference, reward model, a user's tenant): on CUDA
    # the bare CUDA context (not measured in a role's process); on CPU a reference rank's and
    # a reward rank's RSS measured here, 0.63 GB each after a forward of the tiny model, less
    # its few MB of tensors (docs/memory-plan.md). A trainer-like role (the critic) takes the
    # trainer's figures: the same kind of process (DeepSpeed, its own group), not measured.
    (True, "role"): int(0.55e9),
    (False, "role"): int(0.62e9),
}
#: DeepSpeed's gradient reduce bucket (``zero_optimization.reduce_bucket_size``, elements of the
#: communication dtype, the training dtype here), set by ``colocate.actors.deepspeed_backend`` so
# that : the plan's fixed term is this project's number, not DeepSpeed's default (5e8 elements: 1 GB
#: in bf16, 2 GB in fp32, per rank). 2^24 is what HF Accelerate's ``"auto"`` (``hidden_size **
#: 2``) gives a 4096-wide model: 32 MiB in bf16; the tiny CPU models' gradients fit in one.
#: Its effect on reduce-scatter speed on CUDA is not measured.
REDUCE_BUCKET_ELEMENTS = 1 << 24
#: ZeRO-3's optimizer sub-group (``zero_optimization.sub_group_size``, elements per rank): the
#: step flattens and casts one sub-group's gradients at a time. DeepSpeed's default (1e9), set
#: explicitly for the same reason as the bucket.
SUB_GROUP_ELEMENTS = 10**9
CUDA_GRAPHS_ALLOWANCE = 512 << 20  # vLLM's captured graphs (they stay resident across sleep)
# torch's caching allocator reserves more than it hands out: an allowance of 30 % of params +
# grads + optimizer states. First fitted on the H200 run (6.96 GB reserved at the step's peak
# against 5.36 GB allocated after the step); with the step's gradient copies and the reduce
# bucket now counted, that run's planned peak (6.97 GB) already covers what it reserved, so no
# slack was measured there: the 30 % is an unvalidated margin (docs/memory-plan.md).
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
    ROLE = "role"  # the item's name starts with the role's name


class ModelHead(enum.Enum):
    """Which head a model is built with when its shape is counted (:func:`model_shape`)."""

    CAUSAL_LM = "causal_lm"  # the policy, the reference: one logit per vocabulary entry
    SEQUENCE_SCORE = "sequence_score"  # a reward model: one score (num_labels=1)
    TOKEN_SCORE = "token_score"  # a critic: one value per token (num_labels=1)


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


def model_shape(model_dir: str | Path, head: ModelHead = ModelHead.CAUSAL_LM) -> ModelShape:
    """The shape of the HF model in ``model_dir``, counted on the meta device (no weights read).

    Args:
        model_dir: A local HF model directory (its ``config.json``).
        head: The head the model is built with (a score head has one output: ``num_labels=1``).
    """
    import torch
    import transformers

    auto = {
        ModelHead.CAUSAL_LM: transformers.AutoModelForCausalLM,
        ModelHead.SEQUENCE_SCORE: transformers.AutoModelForSequenceClassification,
        ModelHead.TOKEN_SCORE: transformers.AutoModelForTokenClassification,
    }[head]
    labels = {} if head is ModelHead.CAUSAL_LM else {"num_labels": 1}
    config = transformers.AutoConfig.from_pretrained(str(model_dir), **labels)
    with torch.device("meta"):
        model = auto.from_config(config)
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
        micro_batch: Sequences per micro-batch of a trainer rank (padded rows).
        seq_len: Tokens per sequence: the padded rows' length (the engines' max_model_len).
        max_tokens_per_micro_batch: The trainer's token budget: each micro-batch is one packed
            row of this many tokens, in place of ``micro_batch`` rows of ``seq_len`` (None:
            padded rows).
        sdpa_mask: A packed row attends through SDPA with a materialised block-diagonal mask
            (False: flash-attention's varlen kernel, which takes none).
        activation_checkpointing: Recompute activations in backward.
        bucket_bytes: Sync bucket size (two buffers on the sender; two on a receiver that
            does not map the sender's memory, i.e. all but CUDA IPC).
        reduce_bucket_elements: DeepSpeed's ``reduce_bucket_size`` (ZeRO 1-3), in elements.
        sub_group_elements: DeepSpeed's ``sub_group_size`` (ZeRO-3), in elements.
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
    max_tokens_per_micro_batch: int | None = None
    sdpa_mask: bool = True
    activation_checkpointing: bool = False
    bucket_bytes: int = 512 << 20
    reduce_bucket_elements: int = REDUCE_BUCKET_ELEMENTS
    sub_group_elements: int = SUB_GROUP_ELEMENTS
    cuda: bool = True
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        for name in (
            "trainer_ranks",
            "engine_tp",
            "micro_batch",
            "seq_len",
            "bucket_bytes",
            "reduce_bucket_elements",
            "sub_group_elements",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"MemorySettings.{name}={value!r}: must be an int >= 1; fix: pass a "
                    "positive count"
                )
        if self.max_tokens_per_micro_batch is not None:
            _count(
                "MemorySettings", "max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, 1
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


class RoleKind(enum.Enum):
    """How the plan counts a role's rank (:class:`RoleFootprint`)."""

    FROZEN = "frozen"  # forward-only: weights and one micro-batch's forward activations
    TRAINER = "trainer"  # its own ZeRO optimizer: the trainer's rows at its stage and world
    DECLARED = "declared"  # a byte figure its author declares
    UNKNOWN = "unknown"  # not counted (only its process's fixed cost); the plan says so


def _count(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{owner}.{name}={value!r}: must be an int >= {minimum}; fix: pass a count or a "
            "byte figure"
        )


@dataclass(frozen=True)
class RoleFootprint:
    """What one rank of a role holds on its GPU, declared without starting it.

    A role's actor class gives it (``RoleActor.footprint(config)``, run in the driver). Build
    one with :meth:`frozen`, :meth:`trainer`, :meth:`declared` or :meth:`unknown`.

    Attributes:
        kind: How it is counted.
        shape: Its model (FROZEN and TRAINER).
        dtype_bytes: Bytes of its weights' dtype (FROZEN), or of its training dtype (TRAINER).
        micro_batch: Rows per forward (FROZEN), or per micro-batch (TRAINER), each of the
            run's ``seq_len`` tokens (padded rows).
        max_tokens_per_micro_batch: Its token budget: one packed row of this many tokens per
            forward or micro-batch, in place of ``micro_batch`` rows (None: padded rows).
        outputs: Outputs per token of its head: None for an LM head (the vocabulary), 1 for a
            score or value head. Its fp32 outputs and their log-softmax are counted.
        zero_stage: ZeRO stage (TRAINER).
        activation_checkpointing: Recomputes activations in the backward (TRAINER).
        reduce_bucket_elements: DeepSpeed's ``reduce_bucket_size`` (TRAINER).
        sub_group_elements: DeepSpeed's ``sub_group_size`` (TRAINER).
        resident_bytes: Bytes held while resident (DECLARED).
        offloaded_bytes: Bytes kept on the device while offloaded (DECLARED).
    """

    kind: RoleKind
    shape: ModelShape | None = None
    dtype_bytes: int = 4
    micro_batch: int = 1
    outputs: int | None = None
    zero_stage: int = 3
    activation_checkpointing: bool = False
    reduce_bucket_elements: int = REDUCE_BUCKET_ELEMENTS
    sub_group_elements: int = SUB_GROUP_ELEMENTS
    resident_bytes: int = 0
    offloaded_bytes: int = 0
    max_tokens_per_micro_batch: int | None = None

    def __post_init__(self) -> None:
        owner = "RoleFootprint"
        if not isinstance(self.kind, RoleKind):
            raise ConfigError(
                f"{owner}.kind={self.kind!r}: must be a RoleKind; fix: e.g. RoleKind.FROZEN"
            )
        needs_shape = self.kind in (RoleKind.FROZEN, RoleKind.TRAINER)
        if needs_shape and not isinstance(self.shape, ModelShape):
            raise ConfigError(
                f"{owner}.shape={self.shape!r}: a {self.kind.value} role needs its model's "
                "ModelShape; fix: shape=colocate.operations.memory_plan.model_shape(model_dir)"
            )
        if self.dtype_bytes not in (2, 4):
            raise ConfigError(
                f"{owner}.dtype_bytes={self.dtype_bytes!r}: use 2 (bf16/fp16) or 4 (fp32)"
            )
        for name in ("micro_batch", "reduce_bucket_elements", "sub_group_elements"):
            _count(owner, name, getattr(self, name), 1)
        for name in ("outputs", "max_tokens_per_micro_batch"):
            if getattr(self, name) is not None:
                _count(owner, name, getattr(self, name), 1)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{owner}.zero_stage={self.zero_stage!r}: use 0, 1, 2 or 3")
        for name in ("resident_bytes", "offloaded_bytes"):
            _count(owner, name, getattr(self, name), 0)
        if self.kind is RoleKind.DECLARED and self.offloaded_bytes > self.resident_bytes:
            raise ConfigError(
                f"{owner}.offloaded_bytes={self.offloaded_bytes} > resident_bytes="
                f"{self.resident_bytes}: an offloaded rank keeps at most what it held; fix: "
                "declare what stays on the device when offloaded"
            )

    @classmethod
    def frozen(
        cls,
        shape: ModelShape,
        dtype_bytes: int = 4,
        micro_batch: int = 1,
        outputs: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
    ) -> RoleFootprint:
        """A frozen, forward-only model (a reference policy, a reward model)."""
        return cls(
            RoleKind.FROZEN,
            shape,
            dtype_bytes,
            micro_batch,
            outputs,
            max_tokens_per_micro_batch=max_tokens_per_micro_batch,
        )

    @classmethod
    def trainer(
        cls,
        shape: ModelShape,
        zero_stage: int = 3,
        dtype_bytes: int = 4,
        micro_batch: int = 1,
        outputs: int | None = None,
        **buckets,
    ) -> RoleFootprint:
        """A model trained with its own DeepSpeed ZeRO optimizer (a critic).

        ``buckets``: ``activation_checkpointing``, ``reduce_bucket_elements``,
        ``sub_group_elements``, ``max_tokens_per_micro_batch``.
        """
        return cls(
            RoleKind.TRAINER, shape, dtype_bytes, micro_batch, outputs, zero_stage, **buckets
        )

    @classmethod
    def declared(cls, resident_bytes: int, offloaded_bytes: int = 0) -> RoleFootprint:
        """A figure the role's author gives: bytes on the device while resident, offloaded."""
        return cls(
            RoleKind.DECLARED, resident_bytes=resident_bytes, offloaded_bytes=offloaded_bytes
        )

    @classmethod
    def unknown(cls) -> RoleFootprint:
        """Nothing declared: the plan counts its process only, and lists it as not counted."""
        return cls(RoleKind.UNKNOWN)


@dataclass(frozen=True)
class RoleLoad:
    """One role as the planner takes it: what a rank holds, when, and how many ranks.

    Attributes:
        name: The role's name.
        footprint: What one rank holds.
        phases: The loop phases (:data:`LOOP_PHASES`) it is resident in.
        ranks: Its ranks (a trainer-like role's ZeRO shards over them).
    """

    name: str
    footprint: RoleFootprint
    phases: frozenset[str]
    ranks: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.footprint, RoleFootprint):
            raise ConfigError(
                f"RoleLoad({self.name!r}).footprint={self.footprint!r}: must be a "
                "RoleFootprint; fix: e.g. RoleFootprint.unknown()"
            )
        if not (isinstance(self.phases, frozenset) and self.phases <= set(LOOP_PHASES)):
            raise ConfigError(
                f"RoleLoad({self.name!r}).phases={self.phases!r}: must be a frozenset of "
                f"{list(LOOP_PHASES)}; fix: e.g. frozenset({{'score'}})"
            )
        _count(f"RoleLoad({self.name!r})", "ranks", self.ranks, 1)


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
class RoleRows:
    """What one rank of a role holds in each loop phase, on its GPU.

    Attributes:
        name: The role's name.
        kind: How it is counted (UNKNOWN: its model is not counted).
        by_phase: ``(phase, items)`` for each loop phase.
    """

    name: str
    kind: RoleKind
    by_phase: tuple[tuple[str, tuple[MemoryItem, ...]], ...]

    def items(self, phase: str) -> tuple[MemoryItem, ...]:
        """Its items in ``phase``."""
        return dict(self.by_phase).get(phase, ())


@dataclass(frozen=True)
class MemoryPlan:
    """Per pool and phase, what one GPU holds (every GPU of a pool holds the same).

    With roles, a GPU also holds the roles placed on it: :meth:`gpu` gives the phases of a GPU
    of a pool that carries some roles (every loop phase; the tenants of a GPU shared with a
    role move like those of a colocated GPU).
    """

    shape: ModelShape
    settings: MemorySettings
    capacity: int | None
    phases: tuple[GpuPhase, ...]
    roles: tuple[RoleRows, ...] = ()
    role_base: tuple[GpuPhase, ...] = ()  # the pools' tenants on GPUs shared with roles
    loads: tuple[RoleLoad, ...] = ()  # the roles as planned (to plan them again)

    def of(self, pool: Pool) -> list[GpuPhase]:
        """The phases of ``pool``."""
        return [p for p in self.phases if p.pool is pool]

    def peak(self, pool: Pool = Pool.SHARED) -> GpuPhase:
        """The phase of ``pool`` that needs the most."""
        return max(self.of(pool), key=lambda p: p.total)

    @property
    def not_counted(self) -> tuple[str, ...]:
        """The roles whose model is not counted (:attr:`RoleKind.UNKNOWN`)."""
        return tuple(r.name for r in self.roles if r.kind is RoleKind.UNKNOWN)

    def gpu(self, pool: Pool, roles: Sequence[str] = ()) -> list[GpuPhase]:
        """The phases of a GPU of ``pool`` that carries ``roles`` (one rank of each).

        Without roles in the plan this is :meth:`of`. With roles, a shared GPU goes through
        every loop phase the run visits (SCORE too, when a role is resident there) whether or
        not a role sits on it; a separate pool's GPU without roles stays in its one phase.
        """
        names = set(roles)
        missing = names - {r.name for r in self.roles}
        if missing:
            raise ValueError(
                f"roles {sorted(missing)} are not in this plan (it has "
                f"{[r.name for r in self.roles]}); fix: plan_memory(..., roles=[RoleLoad(...)])"
            )
        if not self.roles or (pool is not Pool.SHARED and not names):
            return self.of(pool)
        return [
            GpuPhase(
                pool,
                p.phase,
                p.items + tuple(i for r in self.roles if r.name in names for i in r.items(p.phase)),
            )
            for p in self.role_base
            if p.pool is pool
        ]

    def table(self, pool: Pool = Pool.SHARED, roles: Sequence[str] = ()) -> str:
        """The plan of ``pool`` (with ``roles`` on the GPU) as a text table (GiB), by phase."""
        phases = self.gpu(pool, roles)
        names = sorted({(i.where.value, i.name) for p in phases for i in p.items})
        # 38 wide unless a role's item name needs more
        wide = max([38, *(len(f"{w}: {n}") + 1 for w, n in names)])
        head = f"{'item':{wide}s}" + "".join(f"{p.phase:>10s}" for p in phases)
        rows = [head, "-" * len(head)]
        for where, name in names:
            cells = [
                sum(i.bytes for i in p.items if (i.where.value, i.name) == (where, name))
                for p in phases
            ]
            label = where + ": " + name
            rows.append(f"{label:{wide}s}" + "".join(f"{c / GIB:10.3f}" for c in cells))
        rows.append(f"{'total':{wide}s}" + "".join(f"{p.total / GIB:10.3f}" for p in phases))
        for name in self.not_counted:
            if name in roles:
                rows.append(
                    f"role: {name}: its model is NOT COUNTED (size unknown; only its "
                    "process's fixed cost is)"
                )
        kind = "device memory per GPU" if self.settings.cuda else "host memory per bundle"
        with_roles = f" with roles {', '.join(roles)}" if roles else ""
        return "\n".join(rows) + f"\n(GiB of {kind}; {pool.value} GPUs{with_roles})"


def _trainer(shape: ModelShape, s: MemorySettings, outputs: int | None = None) -> dict[str, int]:
    p, n, w, stage = shape.params, s.trainer_ranks, s.train_dtype_bytes, s.zero_stage
    vocab = shape.vocab if outputs is None else outputs  # a value head has one output
    mixed = w != 4
    g = 4 + (w if mixed else 0)  # a gradient in the training dtype and its fp32 copy
    params = w * p if stage < 3 else w * p // n
    if stage < 3:  # DeepSpeed's documented arithmetic; not validated (docs/memory-plan.md)
        grads = g * p if stage < 2 else g * p // n
        step_grads = 0
    else:
        # Measured (docs/memory-plan.md): the gradient partitions stay allocated between steps
        # in the training dtype; step() flattens one sub-group's gradients and casts them to
        # fp32, then releases both (DeepSpeed 0.19.8 stage3.py, _release_sub_group).
        grads = w * p // n
        step_grads = g * min(p // n, s.sub_group_elements)
    # ZeRO keeps its own fp32 master partition in every dtype (measured at stages 1-3); ZeRO-0
    # in fp32 steps the model's own parameters.
    master = 4 if stage > 0 or mixed else 0
    optim = (8 + master) * p if stage == 0 else (8 + master) * p // n
    reduce = w * s.reduce_bucket_elements if stage > 0 else 0
    b, t = _rows(s.micro_batch, s.seq_len, s.max_tokens_per_micro_batch)
    h = shape.hidden
    per_layer = 17 * w * t * b * h  # 34 s b h in 16-bit (Korthikanti et al.), twice in fp32
    if s.activation_checkpointing:
        acts = w * t * b * h * shape.layers + per_layer
    else:
        acts = per_layer * shape.layers
    acts += 8 * t * b * vocab  # fp32 logits and their log-softmax
    kept = 1 if s.activation_checkpointing else shape.layers  # layers whose mask copy is kept
    masks = _packed_mask(w, t, kept) if _packs(s.max_tokens_per_micro_batch, s) else 0
    state = params + grads + optim + step_grads
    return {
        "params": params,
        "grads": grads,
        "optimizer states": optim,
        "grads, copies in the step": step_grads,
        "reduce bucket": reduce,
        "activations (estimate)": acts,
        "attention masks (estimate)": masks,
        "ZeRO-3 gathered layers": 2 * w * shape.largest_layer_params if stage == 3 else 0,
        "allocator slack": int(ALLOCATOR_SLACK * state) if s.cuda else 0,
    }


def _rows(rows: int, seq: int, budget: int | None) -> tuple[int, int]:
    """A micro-batch's rows and tokens per row: padded rows, or one packed row of the budget."""
    return (rows, seq) if budget is None else (1, budget)


def _packs(budget: int | None, s: MemorySettings) -> bool:
    """Whether a micro-batch at ``budget`` is a packed row whose SDPA mask is materialised."""
    return budget is not None and s.sdpa_mask


def _packed_mask(w: int, tokens: int, kept: int) -> int:
    # Transformers' block-diagonal causal mask of a packed row (booleans, one per query-key
    # pair), and ``kept`` layers' copies of it in the compute dtype: torch's SDPA converts a
    # boolean mask in every call and its fused kernels keep that copy for the backward.
    return tokens * tokens + kept * w * tokens * tokens


def _forward_acts(
    shape: ModelShape, w: int, rows: int, seq: int, outputs: int | None, mask: bool = False
) -> int:
    # Without autograd a layer's intermediates are freed when the next layer runs: one layer's
    # 34 s b h (16-bit; twice in fp32), the residual stream, and the fp32 outputs with their
    # log-softmax; a packed row (``mask``) adds its mask and one layer's copy of it. An
    # estimate, like the trainer's activation row.
    vocab = shape.vocab if outputs is None else outputs
    return (
        17 * w * seq * rows * shape.hidden
        + w * seq * rows * shape.hidden
        + 8 * seq * rows * vocab
        + (_packed_mask(w, seq, 1) if mask else 0)
    )


def _role_forward(f: RoleFootprint, s: MemorySettings) -> int:
    """One forward's activations of a role's rank.

    Its rows of the run's ``seq_len`` tokens, or one packed row of its own budget.
    """
    rows, seq = _rows(f.micro_batch, s.seq_len, f.max_tokens_per_micro_batch)
    mask = _packs(f.max_tokens_per_micro_batch, s)
    return _forward_acts(f.shape, f.dtype_bytes, rows, seq, f.outputs, mask)


def _role_rows(load: RoleLoad, s: MemorySettings) -> RoleRows:
    """What one rank of ``load`` holds in each loop phase (see the module docstring)."""
    f, cuda = load.footprint, s.cuda

    def item(name: str, nbytes: int) -> MemoryItem:
        return MemoryItem(Where.ROLE, f"{load.name} {name}", nbytes)

    trainer_like = f.kind is RoleKind.TRAINER
    fixed = item("fixed per process", FIXED[(cuda, "trainer" if trainer_like else "role")])
    if f.kind is RoleKind.TRAINER:
        own = replace(
            s,
            trainer_ranks=load.ranks,
            zero_stage=f.zero_stage,
            train_dtype_bytes=f.dtype_bytes,
            micro_batch=f.micro_batch,
            max_tokens_per_micro_batch=f.max_tokens_per_micro_batch,
            activation_checkpointing=f.activation_checkpointing,
            reduce_bucket_elements=f.reduce_bucket_elements,
            sub_group_elements=f.sub_group_elements,
        )
        t = {k: item(k, v) for k, v in _trainer(f.shape, own, f.outputs).items()}
        state = [t["params"], t["grads"], t["optimizer states"]]
        state += [t["reduce bucket"]] if f.zero_stage == 3 else []
        # The policy's step rows, its own stage and world; a forward without a step (the
        # critic's values in SCORE) holds its state, a forward's activations, the gathered
        # layers and the allocator's slack.
        step = [*state, *([] if f.zero_stage == 3 else [t["reduce bucket"]])]
        step += [
            t[k]
            for k in (
                "grads, copies in the step",
                "activations (estimate)",
                "attention masks (estimate)",
            )
        ]
        around = [t["ZeRO-3 gathered layers"], t["allocator slack"]]
        acts = item("forward activations (estimate)", _role_forward(f, s))
        resident = {"train": [*step, *around]}
        default = [*state, acts, *around]
        offloaded = [] if cuda else state  # on CPU an offload moves nothing
    elif f.kind is RoleKind.FROZEN:
        weights = item("weights", f.dtype_bytes * f.shape.params)
        acts = item("forward activations (estimate)", _role_forward(f, s))
        resident, default = {}, [weights, acts]
        offloaded = [] if cuda else [weights]
    elif f.kind is RoleKind.DECLARED:
        held = item("declared while resident", f.resident_bytes)
        resident, default = {}, [held]
        offloaded = [item("declared while offloaded", f.offloaded_bytes)] if cuda else [held]
    else:
        resident, default, offloaded = {}, [], []
    by_phase = tuple(
        (
            phase,
            tuple(
                i
                for i in (
                    *(resident.get(phase, default) if phase in load.phases else offloaded),
                    fixed,
                )
                if i.bytes
            ),
        )
        for phase in LOOP_PHASES
    )
    return RoleRows(load.name, f.kind, by_phase)


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
    shape: ModelShape,
    settings: MemorySettings,
    capacity: int | None = None,
    roles: Sequence[RoleLoad] = (),
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
        roles: The roles (none: the plan of engines and trainers only, unchanged). A GPU that
            carries roles is shared, so its engine and trainer move as on a colocated GPU
            (a separate pool's engine receives into buffers of its own); it visits every loop
            phase, SCORE too when a role is resident there (engine asleep, trainer
            offloaded). A role holds its items in the phases it is resident in; offloaded, on
            CUDA a frozen or trainer-like role keeps nothing but its process's fixed cost, a
            declared one its ``offloaded_bytes``; on CPU an offload moves nothing.
    """
    s, e, tr = settings, Where.ENGINE, Where.TRAINER
    fixed_e, fixed_t = FIXED[(s.cuda, "engine")], FIXED[(s.cuda, "trainer")]
    weights = MemoryItem(e, "weights", s.engine_dtype_bytes * shape.params // s.engine_tp)
    kv = MemoryItem(e, "KV cache", _kv(shape, s, capacity, fixed_e))
    graphs = MemoryItem(e, "CUDA graphs", CUDA_GRAPHS_ALLOWANCE * (s.cuda and not s.enforce_eager))
    recv = MemoryItem(e, "receive buffers", 2 * s.bucket_bytes)
    send = MemoryItem(tr, "send buffers", 2 * s.bucket_bytes)
    t = {k: MemoryItem(tr, k, v) for k, v in _trainer(shape, s).items()}
    # What stays allocated between steps: ZeRO-3 keeps its reduce bucket; ZeRO 1-2 allocate it
    # for each backward (counted in the step only).
    state = [t["params"], t["grads"], t["optimizer states"]]
    state += [t["reduce bucket"]] if s.zero_stage == 3 else []
    step = [
        *state,
        *([] if s.zero_stage == 3 else [t["reduce bucket"]]),
        t["grads, copies in the step"],
        t["activations (estimate)"],
        t["attention masks (estimate)"],
        t["ZeRO-3 gathered layers"],
        t["allocator slack"],
    ]
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
    if not roles:
        return MemoryPlan(shape, s, capacity, phases)
    names = [r.name for r in roles]
    if len(set(names)) != len(names):
        raise ConfigError(f"roles={names}: a name twice; fix: give every role its own name")
    loop = {"rollout": shared["rollout"]}
    if any("score" in r.phases for r in roles):
        loop["score"] = [*asleep, *offloaded]  # engines asleep, trainers offloaded
    loop |= {"train": shared["train"], "sync": shared["sync"]}

    def only(where: Where, extra: dict[str, list[MemoryItem]]) -> dict[str, list[MemoryItem]]:
        return {k: [i for i in v if i.where is where] + extra.get(k, []) for k, v in loop.items()}

    with_roles = {
        Pool.SHARED: (loop, [engine_fixed, trainer_fixed]),
        # an engine GPU's sender is on another GPU: it receives into buffers of its own
        Pool.ENGINE: (only(e, {"sync": [recv] if s.cuda else []}), [engine_fixed]),
        Pool.TRAINER: (only(tr, {}), [trainer_fixed]),
    }
    base = tuple(
        GpuPhase(pool, name, tuple(i for i in (*items, *fixed) if i.bytes))
        for pool, (by_phase, fixed) in with_roles.items()
        for name, items in by_phase.items()
    )
    rows = tuple(_role_rows(r, s) for r in roles)
    return MemoryPlan(shape, s, capacity, phases, rows, base, tuple(roles))


@dataclass(frozen=True)
class BundleMemory:
    """One bundle as the check sees it.

    Attributes:
        label: How messages name it (``"bundle 0 (gpu 0 of 10.0.0.5, NVIDIA H200)"``).
        pool: Which tenants it carries.
        capacity: Its device memory on CUDA; on CPU its node's host memory (shared).
        node: The node it is on (CPU bundles of one node are checked together).
        roles: The roles with a rank on it.
    """

    label: str
    pool: Pool
    capacity: int
    node: str = ""
    roles: tuple[str, ...] = ()


def check_plan(plan: MemoryPlan, bundles: Sequence[BundleMemory]) -> None:
    """Refuses a plan that does not fit on every bundle (CUDA) or every node (CPU).

    With a trainer token budget, the fix names ``TrainerConfig.max_tokens_per_micro_batch``
    and the largest budget of at least ``seq_len`` (a sequence at the maximum length) that
    would fit, found by planning again; a role with a budget is named in the roles' fix.

    Raises:
        MemoryPlanError: Names the phase, the GPU (or node), what is needed, what there is and
            the largest items.
    """
    over = _overflow(plan, bundles)
    if over is None:
        return
    phase, need, where, cap, kind = over
    budget = plan.settings.max_tokens_per_micro_batch
    if budget is None:
        batch = "a smaller micro-batch, KV cache"
    else:
        fits = _fitting_budget(plan, bundles)
        would = f"; {fits} fits" if fits is not None else ""
        batch = (
            f"a smaller TrainerConfig.max_tokens_per_micro_batch (now {budget}{would}), "
            "a smaller KV cache"
        )
    fix = (
        "fix: more GPUs (ZeRO shards over them), a higher ZeRO stage, a larger engine TP, "
        f"activation checkpointing, {batch} or gpu_memory_utilization, or smaller sync buckets"
    )
    top = ", ".join(f"{i.where.value} {i.name} {i.bytes / GIB:.2f} GiB" for i in phase.largest())
    here = {i.name for i in phase.items if i.where is Where.ROLE}
    more = ""
    if here:
        # the roles with a budget whose activations this phase holds
        packed = [
            r.name
            for r in plan.loads
            if r.footprint.max_tokens_per_micro_batch is not None
            and any(n.startswith(f"{r.name} ") and "activations" in n for n in here)
        ]
        more = (
            "; or fewer roles on that GPU, a role resident in fewer phases, or a smaller role "
            "model or micro-batch"
        )
        if packed:
            more += f" (roles {packed}: a smaller max_tokens_per_micro_batch)"
    raise MemoryPlanError(
        f"phase {phase.phase!r} needs {need / GIB:.2f} GiB on {where}, which has "
        f"{cap / GIB:.2f} GiB of {kind}; largest items per GPU: {top}; {fix}{more}"
    )


def _overflow(
    plan: MemoryPlan, bundles: Sequence[BundleMemory]
) -> tuple[GpuPhase, int, str, int, str] | None:
    """The first phase that does not fit: (phase, need, where, capacity, kind of memory)."""
    if plan.settings.cuda:
        for b in bundles:
            for phase in plan.gpu(b.pool, b.roles):
                if phase.total > b.capacity:
                    return phase, phase.total, b.label, b.capacity, "device memory"
        return None
    by_node: dict[str, list[BundleMemory]] = defaultdict(list)
    for b in bundles:
        by_node[b.node].append(b)
    for node, members in by_node.items():
        cap = min(b.capacity for b in members)
        # Shared GPUs (and GPUs with roles) change phase together; a separate pool's GPU is
        # in its one phase always.
        moving = [b for b in members if b.pool is Pool.SHARED or b.roles]
        names = list(dict.fromkeys(p.phase for b in moving for p in plan.gpu(b.pool, b.roles))) or [
            "steady"
        ]
        for name in names:
            parts = []
            for b in members:
                own = plan.gpu(b.pool, b.roles)
                parts.append(next((p for p in own if p.phase == name), max(own, key=_total)))
            need = sum(p.total for p in parts)
            if need > cap:
                where = f"node {node or '?'} ({len(members)} bundles share its host memory)"
                return max(parts, key=_total), need, where, cap, "host memory (CPU run)"
    return None


def _fitting_budget(plan: MemoryPlan, bundles: Sequence[BundleMemory]) -> int | None:
    """The largest trainer budget in ``[seq_len, budget)`` whose plan fits, or None.

    Every term grows with the budget, so a bisection finds it. Below ``seq_len`` a sequence at
    the maximum length could not be trained: no smaller budget is offered.
    """
    s = plan.settings
    budget = s.max_tokens_per_micro_batch
    if budget is None:
        return None

    def fits(tokens: int) -> bool:
        again = replace(s, max_tokens_per_micro_batch=tokens)
        return _overflow(plan_memory(plan.shape, again, plan.capacity, plan.loads), bundles) is None

    lo, hi = s.seq_len, budget - 1  # the answer, if any, is in [lo, hi]
    if lo > hi or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _total(phase: GpuPhase) -> int:
    return phase.total
