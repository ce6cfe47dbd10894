"""The interface a trainer rank's training engine implements (its factory: ``backends``).

Two backends, one file each: DeepSpeed ZeRO 0-3 (``colocate.actors.deepspeed_backend``) and plain
torch on one rank (``colocate.actors.torch_backend``). The trainer actor owns the protocol side
(memory state, spans, faults, the sync's stores); a backend owns the model, the optimizer and the
moves of their tensors.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from colocate.algorithms.metrics import merge_metrics
from colocate.core.config import TrainerConfig

__all__ = ["TrainerBackend", "load_model", "train_device", "accumulate"]

#: One micro-batch of an optimizer step and its weight (its share of the step's loss tokens).
Weighted = tuple[dict, float]


def train_device() -> torch.device:
    """The device this process trains on: its CUDA device if it sees one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_model(config: TrainerConfig) -> torch.nn.Module:
    """The trainer's starting model, from its local directory, in fp32 (master weights)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)


def prepare_model(model: torch.nn.Module, config: TrainerConfig) -> torch.nn.Module:
    """Applies the config's model options (activation checkpointing) to the starting model."""
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a KV cache is not kept while recomputing
    return model


def accumulate(
    loss_fn: Callable,
    model: Any,
    micro: list[Weighted],
    after_forward: Callable[[], None],
    backward: Callable[[torch.Tensor], None],
    before: Callable[[bool], None] = lambda last: None,
) -> tuple[float, dict[str, float]]:
    """Forward and weighted backward of every micro-batch of one optimizer step.

    Steps, per micro-batch ``i``: ``before(last)``; ``loss_fn``; ``after_forward()`` after the
    first forward; ``backward(weight * loss)``. The caller then clips and steps once.

    Returns:
        The weighted loss and the metrics combined by
        :func:`colocate.algorithms.metrics.merge_metrics`
        (weighted means; ``*_max`` metrics their maximum).
    """
    total, rows = 0.0, []
    for i, (batch, weight) in enumerate(micro):
        before(i == len(micro) - 1)
        loss, m = loss_fn(model, batch)
        if i == 0:
            after_forward()
        backward(loss * weight)
        total += float(loss.detach()) * weight
        rows.append(m)
    return total, merge_metrics(rows, [weight for _, weight in micro])


class TrainerBackend(ABC):
    """Model and optimizer of one trainer rank.

    Args:
        config: The trainer configuration.
        rank: This rank.
        world_size: Trainer ranks.
        model_factory: Builds the starting model (fp32), or returns None for the backend's
            own loading of ``config.model`` (:meth:`load_default`).
    """

    def __init__(
        self,
        config: TrainerConfig,
        rank: int,
        world_size: int,
        model_factory: Callable[[], torch.nn.Module] | None = None,
    ):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device = train_device()
        #: How the model was built on this rank (reported by :meth:`describe`).
        self.start_mode = "full model per rank"
        self._factory = model_factory or (lambda: None)

    def build_model(self) -> torch.nn.Module:
        """The starting model: the factory's, else :meth:`load_default`.

        The config's model options (activation checkpointing) are applied to either.
        """
        model = self._factory()
        if model is None:
            model = self.load_default()
        else:
            self.start_mode = "given by the trainer's load_model"
        return prepare_model(model, self.config)

    def load_default(self) -> torch.nn.Module:
        """``config.model`` in full on this rank (:func:`load_model`)."""
        return load_model(self.config)

    def prepare(self, store: Any, master: tuple[str, int], timeout_s: float) -> dict[str, float]:
        """The start-up work that takes no device memory; :meth:`start` does the rest.

        Here: the imports the model build needs (transformers and the model's own module). A
        backend with a process group joins it here too. Idempotent.

        Returns:
            Seconds per part (``imports_s``; ``group_s`` where a group is joined).
        """
        t0 = time.perf_counter()
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            # Resolving the class imports its modeling module (transformers imports lazily).
            MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(self.config.model))]
        except (OSError, ValueError, KeyError):
            pass  # only a warm-up: the model build reports what is wrong with the model
        return {"imports_s": time.perf_counter() - t0}

    @abstractmethod
    def start(self, store: Any, master: tuple[str, int], timeout_s: float) -> None:
        """Builds model and optimizer on the device.

        Runs :meth:`prepare` first if it has not run (joining the trainer group over ``store``
        at ``master``).
        """

    @property
    @abstractmethod
    def model(self) -> Any:
        """What the user's ``loss_fn`` is called with (callable like the HF model)."""

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The underlying HF module."""

    @property
    @abstractmethod
    def optimizer(self) -> Any:
        """The optimizer doing the steps (DeepSpeed's wrapper, or the torch optimizer)."""

    @property
    def optimizer_name(self) -> str:
        """Class name of the optimizer doing the steps."""
        return type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__

    @abstractmethod
    def step(
        self, loss_fn: Callable, micro: list[Weighted], after_forward: Callable[[], None]
    ) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``micro`` (see :func:`accumulate`), then clip and step.

        Returns:
            The loss and metrics, weighted over the micro-batches.
        """

    @abstractmethod
    def offload(self, keep_params: bool) -> None:
        """Moves grads and optimizer states (and the params unless ``keep_params``) to host."""

    @abstractmethod
    def reload(self) -> None:
        """Brings every offloaded tensor back to the training device."""

    @abstractmethod
    def weight_source(self):
        """The ``weight_sync.WeightSource`` over this rank's parameters."""

    @abstractmethod
    def save(self, path: str, steps: int) -> None:
        """Checkpoints model, optimizer and ``steps`` under ``path`` (all ranks at once)."""

    @abstractmethod
    def load(self, path: str) -> int:
        """Restores what :meth:`save` wrote; returns the step count."""

    def all_reduce(self, values: list[float], op: str) -> list[float]:
        """The element-wise ``"max"`` or ``"sum"`` of ``values`` over the trainer group.

        How ranks with different shards agree on how many micro-batches to run (ZeRO-3's
        gathers need every rank in each) and on a step's loss tokens; every rank calls it at
        once, bounded by the group's timeout. One rank: as given.
        """
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return [float(v) for v in values]
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
        return [float(v) for v in t.cpu()]

    def describe(self) -> dict:
        """Backend, ZeRO stage, optimizer and parameter count."""
        return {
            "rank": self.rank,
            "deepspeed": self.config.deepspeed,
            "zero_stage": int(self.config.zero_stage) if self.config.deepspeed else None,
            "optimizer": self.optimizer_name,
            "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters()),
            "start_mode": self.start_mode,
        }

    @abstractmethod
    def shutdown(self) -> None:
        """Leaves the trainer group (if any) and drops model and optimizer. Idempotent."""
