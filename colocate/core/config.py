"""Typed, frozen, validated configuration of engines, trainers and the weight sync.

Every check that can run in the driver runs in ``__post_init__`` (or in
:func:`check_engine_model`, which reads the model's config.json), so bad input fails before any
actor starts. Messages name the field, the value and the fix.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "LoadFormat",
    "DType",
    "ZeroStage",
    "EngineConfig",
    "TrainerConfig",
    "SyncConfig",
    "Sampling",
    "Pipeline",
    "StalenessPolicy",
    "PipelineConfig",
    "check_engine_model",
]

# Head sizes the vLLM CPU attention backend accepts (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes, vLLM 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names field, value and fix."""


def _err(owner: str, name: str, value: object, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{owner}.{name}={value!r}: {problem}; fix: {fix}")


def _positive_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(owner, name, value, f"must be an int >= {minimum}", f"pass an int >= {minimum}")


def _finite(owner: str, name: str, value: object, lo: float, hi: float, lo_open=True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise _err(
            owner,
            name,
            value,
            f"must be a finite number in {bracket}{lo:g}, {hi:g}]",
            f"pass a value in {bracket}{lo:g}, {hi:g}]",
        )


def _model_path(owner: str, value: object) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise _err(
            owner,
            "model",
            value,
            "must be a local directory path",
            "pass the path of an HF model directory",
        )
    return str(value)


class LoadFormat(enum.Enum):
    """How an engine gets its first weights."""

    AUTO = "auto"  # from the model directory
    DUMMY = "dummy"  # random; the first sync brings the real weights before it serves


class DType(enum.Enum):
    """Parameter dtypes supported end to end."""

    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @property
    def torch(self):
        """The torch dtype."""
        import torch

        return getattr(torch, self.value)


class ZeroStage(enum.IntEnum):
    """DeepSpeed ZeRO stage (0 = plain data parallel)."""

    ZERO0 = 0
    ZERO1 = 1
    ZERO2 = 2
    ZERO3 = 3


def _enum(owner: str, name: str, value: object, cls: type[enum.Enum]) -> enum.Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise _err(owner, name, value, "is not a known value", f"use one of {choices}") from None


@dataclass(frozen=True)
class EngineConfig:
    """One vLLM engine.

    Attributes:
        model: Local HF model directory (config.json, tokenizer, weights unless DUMMY).
        load_format: AUTO loads the directory's weights; DUMMY starts from random weights.
        dtype: The engine's parameter dtype (weights are cast to it on the way).
        tensor_parallel_size: TP size; must match the topology's ``engine_tp``.
        gpu_memory_utilization: Share of a GPU's memory vLLM may take (CUDA). With colocated
            trainers, vLLM only starts if this share is free, which the start-up order ensures.
            On CPU, with ``kv_cache_bytes=None``, the share of host memory vLLM takes.
        max_model_len: Longest prompt + completion.
        kv_cache_bytes: KV cache size on CPU (vLLM's ``kv_cache_memory_bytes``); CUDA sizes
            its cache from ``gpu_memory_utilization`` unless this is set.
        enforce_eager: Disable CUDA graphs. Default: False on CUDA (graphs survive sleep),
            True on CPU (no graphs there).
        seed: Engine seed (sampling is seeded per engine, not per request).
        max_num_seqs: Concurrent sequences.
        log_level: vLLM's log level inside the engine actor (``VLLM_LOGGING_LEVEL``).
        vllm_kwargs: Other ``vllm.LLM`` keyword arguments, passed through unchanged.
        rpc_timeout_s: Bound on each call the engine actor makes into its vLLM workers
            (``collective_rpc``: the CPU sleep's release and re-acquire, the sync's set-up and
            receive, the warm-up wait; not vLLM's own sleep and wake_up). vLLM
            applies it where the workers are other processes (TP > 1); an in-process worker
            (TP 1) runs the call on the actor's own thread, bounded by the call's own waits
            (every transfer wait by ``SyncConfig.timeout_s``).
    """

    model: str
    load_format: LoadFormat = LoadFormat.AUTO
    dtype: DType = DType.BFLOAT16
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.45
    max_model_len: int = 512
    kv_cache_bytes: int | None = 64 << 20
    enforce_eager: bool | None = None
    seed: int = 0
    max_num_seqs: int = 256
    log_level: str = "WARNING"
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    rpc_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        owner = "EngineConfig"
        object.__setattr__(self, "model", _model_path(owner, self.model))
        object.__setattr__(
            self, "load_format", _enum(owner, "load_format", self.load_format, LoadFormat)
        )
        object.__setattr__(self, "dtype", _enum(owner, "dtype", self.dtype, DType))
        _positive_int(owner, "tensor_parallel_size", self.tensor_parallel_size)
        _finite(owner, "gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0)
        _positive_int(owner, "max_model_len", self.max_model_len, 16)
        if self.kv_cache_bytes is not None:
            _positive_int(owner, "kv_cache_bytes", self.kv_cache_bytes, 1 << 20)
        _positive_int(owner, "max_num_seqs", self.max_num_seqs)
        _positive_int(owner, "seed", self.seed, 0)
        _finite(owner, "rpc_timeout_s", self.rpc_timeout_s, 0.0, 86400.0)
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise _err(
                owner,
                "log_level",
                self.log_level,
                "is not a log level",
                "use DEBUG, INFO, WARNING, ERROR or CRITICAL",
            )
        reserved = {
            "model",
            "load_format",
            "dtype",
            "tensor_parallel_size",
            "seed",
            "worker_extension_cls",
            "enable_sleep_mode",
        }
        clash = sorted(reserved & set(self.vllm_kwargs))
        if clash:
            raise _err(
                owner,
                "vllm_kwargs",
                clash,
                "sets arguments this config owns",
                "use the EngineConfig fields instead",
            )


@dataclass(frozen=True)
class TrainerConfig:
    """The trainer ranks (all ranks share one config).

    Attributes:
        model: Local HF model directory the trainer starts from.
        zero_stage: DeepSpeed ZeRO stage.
        dtype: Training dtype (bf16 uses DeepSpeed's bf16 mode with fp32 master weights).
        lr: Learning rate of DeepSpeed's AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        grad_clip: Gradient-norm clip (0 disables).
        seed: Seed of the trainer's RNG.
        deepspeed: False gives the plain-torch fallback trainer (one rank, torch AdamW,
            offload to pinned host memory).
        ds_config: Extra DeepSpeed config entries, merged over the generated ones.
        micro_batch_size: Most rows of a rank's shard per forward/backward; gradients are
            accumulated over the micro-batches of an optimizer step, each weighted by its share
            of the step's loss tokens (``loss_tokens``), so the step equals the full-batch
            step for a loss that is the mean over its batch's tokens. None: one micro-batch.
        max_tokens_per_micro_batch: Train on packed sequences in token-budget micro-batches
            (in place of ``micro_batch_size``): each micro-batch is one row of whole sequences
            concatenated, each with its own position ids and attention confined to itself, at
            most this many tokens, the sequences spread over micro-batches by a balanced
            partition of their tokens (``colocate.algorithms.packing``). A sequence longer than
            the budget is refused. None: padded rows.
        mini_batches: Optimizer steps per epoch over a train call's batch (PPO-style).
        epochs: Passes over the batch per train call.
        activation_checkpointing: Recompute each decoder layer's activations in the backward
            (HF gradient checkpointing): less activation memory for one more forward.
        loss_tokens: The batch field whose sum counts a micro-batch's loss tokens (a 0/1
            mask); a batch without it weighs micro-batches by rows.
    """

    model: str
    zero_stage: ZeroStage = ZeroStage.ZERO3
    dtype: DType = DType.FLOAT32
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    deepspeed: bool = True
    ds_config: dict[str, Any] = field(default_factory=dict)
    micro_batch_size: int | None = None
    max_tokens_per_micro_batch: int | None = None
    mini_batches: int = 1
    epochs: int = 1
    activation_checkpointing: bool = False
    loss_tokens: str = "completion_mask"

    def __post_init__(self) -> None:
        owner = "TrainerConfig"
        if self.micro_batch_size is not None:
            _positive_int(owner, "micro_batch_size", self.micro_batch_size)
        if self.max_tokens_per_micro_batch is not None:
            _positive_int(owner, "max_tokens_per_micro_batch", self.max_tokens_per_micro_batch)
            if self.micro_batch_size is not None:
                raise _err(
                    owner,
                    "micro_batch_size",
                    self.micro_batch_size,
                    "goes with rows of padding, max_tokens_per_micro_batch with packed tokens",
                    "pass one of the two",
                )
        _positive_int(owner, "mini_batches", self.mini_batches)
        _positive_int(owner, "epochs", self.epochs)
        if not isinstance(self.activation_checkpointing, bool):
            raise _err(
                owner,
                "activation_checkpointing",
                self.activation_checkpointing,
                "must be a bool",
                "pass True or False",
            )
        if not isinstance(self.loss_tokens, str) or not self.loss_tokens:
            raise _err(
                owner,
                "loss_tokens",
                self.loss_tokens,
                "must be a batch field name",
                'pass e.g. "completion_mask"',
            )
        object.__setattr__(self, "model", _model_path(owner, self.model))
        object.__setattr__(self, "zero_stage", _zero(self.zero_stage))
        object.__setattr__(self, "dtype", _enum(owner, "dtype", self.dtype, DType))
        _finite(owner, "lr", self.lr, 0.0, 10.0)
        _finite(owner, "weight_decay", self.weight_decay, 0.0, 1.0, lo_open=False)
        _finite(owner, "grad_clip", self.grad_clip, 0.0, 1e6, lo_open=False)
        if len(self.betas) != 2:
            raise _err(owner, "betas", self.betas, "must have two values", "pass (0.9, 0.999)")
        for b in self.betas:
            _finite(owner, "betas", b, 0.0, 1.0, lo_open=False)
        _positive_int(owner, "seed", self.seed, 0)


def _zero(value: object) -> ZeroStage:
    try:
        return ZeroStage(value)
    except ValueError:
        raise _err(
            "TrainerConfig", "zero_stage", value, "is not a ZeRO stage", "use 0, 1, 2 or 3"
        ) from None


@dataclass(frozen=True)
class SyncConfig:
    """The weight transfer.

    Attributes:
        bucket_bytes: Bucket size; None picks the device default (32 MiB CPU, 512 MiB CUDA).
        verify: Fingerprint every tensor on both sides and compare (the version is bumped only
            after a verified sync).
        timeout_s: Bound on every collective and store wait of the transfer.
    """

    bucket_bytes: int | None = None
    verify: bool = True
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.bucket_bytes is not None:
            if (
                isinstance(self.bucket_bytes, bool)
                or not isinstance(self.bucket_bytes, int)
                or (self.bucket_bytes <= 0)
            ):
                raise _err(
                    "SyncConfig",
                    "bucket_bytes",
                    self.bucket_bytes,
                    "must be an int > 0",
                    "pass e.g. 32 << 20, or None for the device default",
                )
        _finite("SyncConfig", "timeout_s", self.timeout_s, 0.0, 86400.0)


class Pipeline(enum.Enum):
    """How rollouts and training follow each other.

    SYNC: in turns; every batch is generated with the trainer's current weights.
    ASYNC: one-step off-policy, for trainer and engines on separate GPUs: the engines
        generate batch k+1 (``Coordinator.generate_async``) while the trainer trains on batch
        k; the weights of step k reach the engines before batch k+2 starts.
    PARTIAL: partial rollouts, on shared GPUs too: the engines keep ``in_flight_groups``
        prompt groups in flight; ``Coordinator.generate`` returns as soon as the batch's
        groups are complete, the unfinished requests keep their tokens and resume after the
        sync under the new weights (``colocate.algorithms.partial``).
    """

    SYNC = "sync"
    ASYNC = "async"
    PARTIAL = "partial"


class StalenessPolicy(enum.Enum):
    """PARTIAL: what becomes of a group whose tokens would span more than ``max_staleness``.

    WAIT: the rollout before that keeps generating until the group is finished (none dropped).
    DROP: the group is dropped and counted (``rollouts.stats["dropped_by_reason"]["stale"]``).
    """

    WAIT = "wait"
    DROP = "drop"


@dataclass(frozen=True)
class PipelineConfig:
    """Rollout/training overlap.

    Attributes:
        mode: SYNC, ASYNC or PARTIAL.
        max_staleness: ASYNC: most optimizer steps between the weights that generated a
            batch and the weights it is trained on (``Coordinator.train`` refuses more).
            PARTIAL: most trainer steps between the weights of a completion's oldest and
            newest tokens (``colocate.algorithms.partial``).
        in_flight_groups: PARTIAL only: prompt groups kept in flight (started, unfinished)
            at each rollout's start; more than a batch's groups, or nothing runs ahead.
        staleness_policy: PARTIAL only: ``"wait"`` (a group that would exceed
            ``max_staleness`` is finished before the hand-over; none dropped) or ``"drop"``
            (it is dropped and counted).
    """

    mode: Pipeline = Pipeline.SYNC
    max_staleness: int = 1
    in_flight_groups: int | None = None
    staleness_policy: StalenessPolicy = StalenessPolicy.WAIT

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum("PipelineConfig", "mode", self.mode, Pipeline))
        _positive_int("PipelineConfig", "max_staleness", self.max_staleness)
        policy = _enum("PipelineConfig", "staleness_policy", self.staleness_policy, StalenessPolicy)
        object.__setattr__(self, "staleness_policy", policy)
        groups = self.in_flight_groups
        if self.mode is Pipeline.PARTIAL:
            if groups is None:
                raise _err(
                    "PipelineConfig",
                    "in_flight_groups",
                    groups,
                    "mode='partial' keeps this many prompt groups in flight",
                    "pass more than a train batch's groups, e.g. twice as many",
                )
            _positive_int("PipelineConfig", "in_flight_groups", groups)
        elif groups is not None:
            raise _err(
                "PipelineConfig",
                "in_flight_groups",
                groups,
                f"only mode='partial' keeps groups in flight (mode={self.mode.value!r})",
                "drop it, or pass mode='partial'",
            )

    @property
    def staleness_bound(self) -> int | None:
        """The staleness a train batch may have: ``max_staleness`` in ASYNC mode, else none."""
        return self.max_staleness if self.mode is Pipeline.ASYNC else None


@dataclass(frozen=True)
class Sampling:
    """Sampling for one generate call (mapped onto ``vllm.SamplingParams``).

    Attributes:
        n: Completions per prompt (a GRPO group).
        max_tokens: Tokens generated per completion.
        temperature: 0 is greedy.
        top_p: Nucleus sampling.
        logprobs: Return the sampled tokens' log-probabilities.
        extra: Other ``SamplingParams`` fields. A per-request ``seed`` makes the ``n``
            completions of a prompt nearly identical on an untrained model: seed the engine.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    logprobs: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive_int("Sampling", "n", self.n)
        _positive_int("Sampling", "max_tokens", self.max_tokens)
        _finite("Sampling", "temperature", self.temperature, 0.0, 100.0, lo_open=False)
        _finite("Sampling", "top_p", self.top_p, 0.0, 1.0)

    def to_vllm(self):
        """The equivalent ``vllm.SamplingParams``."""
        from vllm import SamplingParams

        return SamplingParams(
            n=self.n,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            logprobs=0 if self.logprobs else None,
            **self.extra,
        )


def check_engine_model(config: EngineConfig, device=None) -> dict:
    """Checks the engine's model directory in the driver, before any actor starts.

    Args:
        config: The engine configuration.
        device: The bundles' device kind (``placement.DeviceKind``, or its value), as the
            placement probe found it; None skips the device-specific checks (the coordinator
            runs them once the reservation knows the device, still before any actor starts).

    Returns:
        The model's config.json as a dict.

    Raises:
        ConfigError: Missing directory or config, TP that does not divide the heads, or a
            head size the CPU backend refuses.
    """
    from placement.hardware import DeviceKind

    path = Path(config.model)
    if not path.is_dir():
        raise _err(
            "EngineConfig",
            "model",
            config.model,
            "is not a directory",
            "pass a local HF model directory (nothing is downloaded)",
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise _err(
            "EngineConfig",
            "model",
            config.model,
            "has no config.json",
            "pass a directory written by save_pretrained",
        )
    hf = json.loads(cfg_file.read_text())
    heads = hf.get("num_attention_heads")
    kv_heads = hf.get("num_key_value_heads", heads)
    tp = config.tensor_parallel_size
    if heads and heads % tp:
        raise _err(
            "EngineConfig",
            "tensor_parallel_size",
            tp,
            f"does not divide the model's num_attention_heads={heads}",
            "use a TP size that divides the number of heads",
        )
    if kv_heads and kv_heads % tp and tp % kv_heads:
        raise _err(
            "EngineConfig",
            "tensor_parallel_size",
            tp,
            f"and num_key_value_heads={kv_heads} do not divide one another",
            "use a TP size that divides (or is a multiple of) the KV heads",
        )
    head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if heads else None)
    cpu = device is not None and DeviceKind(device) is DeviceKind.CPU
    if cpu and head_dim is not None and head_dim not in CPU_HEAD_SIZES:
        raise _err(
            "EngineConfig",
            "model",
            config.model,
            f"has head_dim={head_dim}, which the vLLM CPU backend refuses",
            f"use a model whose head size is one of {CPU_HEAD_SIZES}",
        )
    if (
        config.load_format is LoadFormat.AUTO
        and not any(path.glob("*.safetensors"))
        and not any(path.glob("*.bin"))
    ):
        raise _err(
            "EngineConfig",
            "model",
            config.model,
            "holds no weights",
            "add the weights, or use load_format=LoadFormat.DUMMY",
        )
    return hf
