"""One rank of a trained model: what the policy's trainer and the critic share.

A :class:`RankTrainer` owns a backend (``colocate.actors.backends``: DeepSpeed ZeRO 0-3 or
plain torch) and everything around it that does not depend on what is trained: DeepSpeed's op
environment, the group's store (hosted by rank 0, joined by the others), the micro-batched
train loop, the memory state of offload and reload, and checkpoints. What is trained is given:
a model factory and a loss function. The policy's trainer rank
(``colocate.actors.trainer.TrainerActor``) adds the weight sync and the protocol's faults; the
critic (``colocate.roles.critic.CriticActor``) adds a value head, a value loss and its values.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from colocate.actors.backends import make_backend
from colocate.actors.cpu.ds_ops import op_environment, prepare_ops
from colocate.actors.trainer_backend import TrainerBackend
from colocate.algorithms.batches import (
    batch_rows,
    counted_packed_parts,
    counted_parts,
    weigh_parts,
)
from colocate.algorithms.micro_batches import (
    plan_step,
    plan_token_step,
    token_step_counts,
)
from colocate.algorithms.packing import PackedModel, check_packing, sequence_lengths
from colocate.core.config import DType, TrainerConfig
from colocate.core.contract import Seat
from colocate.core.errors import ActorStateError
from colocate.core.phases import TrainerMemory

__all__ = ["RankTrainer", "LossFn", "SpanFn", "node_address"]

#: ``loss_fn(model, batch) -> (loss, metrics)``: ``model`` is callable like the HF model (the
#: DeepSpeed engine forwards to it), ``batch`` is this rank's shard, ``metrics`` plain floats.
LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]]
#: ``span(name, **detail)``: a timeline span around a block (``Tenant.span``), yielding its
#: detail dict.
SpanFn = Callable[..., AbstractContextManager[dict]]

_ORDER = (TrainerMemory.OFFLOADED, TrainerMemory.PARAMS, TrainerMemory.FULL)


def node_address(multi_node: bool) -> str:
    """The address a rank's listeners bind to: loopback unless peers are on other nodes."""
    if not multi_node:
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()


def _packed_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` given a model that refuses a call mixing packed sequences (PackedModel)."""

    def packed(model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return loss_fn(PackedModel(model), batch)

    return packed


def _shape_metrics(micro: list[tuple[dict, float]]) -> dict[str, float]:
    """How one optimizer step ran: its micro-batches, and the share of its tokens that pad.

    Every forward's tokens count (``input_ids``: rows x width, or one packed row), fillers'
    included; real tokens are the ``attention_mask``'s (a packed row has no padding).
    """
    computed = real = 0
    for part, _ in micro:
        ids = part["input_ids"]
        mask = part.get("attention_mask")
        computed += ids.numel()
        real += int(mask.sum()) if mask is not None else ids.numel()
    return {"micro_batches": float(len(micro)), "padding_fraction": 1.0 - real / computed}


@contextlib.contextmanager
def _no_span(name: str, **detail: Any) -> Iterator[dict]:
    yield dict(detail)


class RankTrainer:
    """One rank's model, optimizer, group, train loop, memory moves and checkpoints.

    Every collective method (``prepare``, ``start``, ``train``, ``save``, ``load``) is called
    on every rank at once. Methods that move or train take ``span``: the name of the timeline
    span to record around the work when there is work to do (None: none).

    Args:
        config: The trainer configuration (shared by all ranks).
        seat: The actor's seat: its group (whose store is ``<group>-group``), rank, world size
            and name (for errors).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)`` (see :data:`LossFn`).
        model_factory: Builds the starting model (fp32), or returns None for the backend's own
            loading of ``config.model``; called once, by :meth:`start`.
        span: Records a timeline span (the actor's ``Tenant.span``); None records nothing.
        after_forward: Called after the first forward of every optimizer step (fault hooks).
    """

    def __init__(
        self,
        config: TrainerConfig,
        seat: Seat,
        loss_fn: LossFn,
        model_factory: Callable[[], torch.nn.Module | None],
        span: SpanFn | None = None,
        after_forward: Callable[[], None] = lambda: None,
    ):
        # This environment's own ninja and extension cache (colocate.actors.cpu.ds_ops): never a
        # rebuild. Set before anything imports DeepSpeed.
        os.environ.update(op_environment())
        # DeepSpeed calls torch.distributed APIs that torch has deprecated: one FutureWarning
        # per call, per step, per rank. They say nothing about this run.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        self.config = config
        self.rank = seat.rank
        self.world_size = seat.world_size
        self.name = seat.name
        self.loss_fn = loss_fn
        self.group_key = f"{seat.group}-group"
        self.backend: TrainerBackend = make_backend(
            config, seat.rank, seat.world_size, model_factory
        )
        self.memory = TrainerMemory.FULL
        self.started = False
        self.steps = 0
        self._span: SpanFn = span or _no_span
        self._after_forward = after_forward
        self._prepared: dict | None = None  # what prepare() did, once it has
        self._store = None  # this rank's handle on the group's store (prepare)
        self._hosted: tuple | None = None  # rank 0: (store, listening socket)

    # ----- start-up ---------------------------------------------------------------------------

    def host_group_store(self, multi_node: bool, timeout_s: float) -> tuple[str, int]:
        """Rank 0: starts the group's store, bound to one address; returns ``(host, port)``.

        torch's own env:// rendezvous would listen on every interface; this one listens on
        :func:`node_address` only (loopback on a single node).
        """
        from weight_sync.store import host_store

        host = node_address(multi_node)
        store, port, sock = host_store(host, self.world_size, timeout_s, key=self.group_key)
        self._hosted = (store, sock)
        return host, port

    def prepare(
        self, master: tuple[str, int], timeout_s: float, span: str | None = None
    ) -> dict[str, float]:
        """The memory-free part of :meth:`start`. Idempotent.

        Loads DeepSpeed's ops (built by the set-up; loaded, never hung, here), imports what
        the model build needs and joins the group at ``master`` (``TrainerBackend.prepare``):
        nothing on the device.

        Returns:
            Seconds each part took (``ops_s``, ``imports_s``, ``group_s``).
        """
        if self._prepared is not None:
            return self._prepared
        with self._record(span) as detail:
            t0 = time.perf_counter()
            if self.config.deepspeed:
                prepare_ops(timeout_s)
            detail["ops_s"] = time.perf_counter() - t0
            self._store = self._join_group(master, timeout_s)
            detail.update(self.backend.prepare(self._store, master, timeout_s))
        self._prepared = dict(detail)
        return self._prepared

    def start(self, master: tuple[str, int], timeout_s: float, span: str | None = None) -> dict:
        """Builds the model and optimizer on the device (resident). Idempotent.

        Prepares first (:meth:`prepare`, recording no span) if that has not run.

        Returns:
            :meth:`describe`.
        """
        if self.started:
            return self.describe()
        self.prepare(master, timeout_s)
        with self._record(span):
            torch.manual_seed(self.config.seed)
            self.backend.start(self._store, master, timeout_s)
            if self.config.max_tokens_per_micro_batch is not None:
                self._check_packing()
            # DeepSpeed's offload_states ends in gc.collect(), which walks every object the
            # imports and the model created (a large share of a step on CPU: docs/design.md,
            # section 8a): move them out of the collector's way once they exist.
            gc.freeze()
        self.started = True
        self.memory = TrainerMemory.FULL
        return self.describe()

    def _check_packing(self) -> None:
        """Refuses a model that mixes packed sequences, before the first step (every rank)."""
        module = self.backend.module
        where = f"TrainerConfig.max_tokens_per_micro_batch with {self.config.model!r}"
        # A low-precision forward differs from its own unpacked forward by its rounding.
        atol = 1e-4 if self.config.dtype is DType.FLOAT32 else 5e-2
        check_packing(module, where, module.config.vocab_size, atol)

    def _join_group(self, master: tuple[str, int], timeout_s: float):
        if self.rank == 0:
            return self._hosted[0] if self._hosted else None
        from weight_sync.store import join_store

        return join_store(master[0], master[1], self.world_size, timeout_s, self.group_key)

    def describe(self) -> dict:
        """Rank, backend, ZeRO stage, optimizer class and parameter count."""
        return self.backend.describe()

    # ----- training ---------------------------------------------------------------------------

    def train(
        self, shard: dict, max_rows: int | None = None, span: str | None = None
    ) -> list[dict[str, float]]:
        """The optimizer steps of one train call on this rank's shard (all ranks at once).

        For each of ``config.epochs`` passes, for each of ``config.mini_batches`` parts of the
        shard, one optimizer step accumulated over micro-batches of at most
        ``config.micro_batch_size`` rows, each weighted by its share of the step's loss tokens
        summed over every rank (:meth:`agree_sum`; ``colocate.algorithms.micro_batches``), so
        the step is the full batch's however it was sharded. Every rank plans the same number of
        micro-batches from ``max_rows``, the largest rank's shard (ZeRO-3 gathers run in step
        on every rank; None: this shard's rows, right only when every shard is as large).

        With ``config.max_tokens_per_micro_batch`` the micro-batches are packed sequences of
        at most that many tokens (``colocate.algorithms.packing``), spread by a balanced
        partition of tokens; the ranks agree on each step's count first (:meth:`agree_max`),
        and the loss function's model refuses a call that would mix packed sequences.

        Returns:
            One row per optimizer step, in order: ``loss``, the loss function's metrics,
            ``micro_batches`` and ``padding_fraction`` (the share of the tokens its forwards
            computed that were padding).
        """
        self.require(TrainerMemory.FULL, "train_step")
        config = self.config
        rows = batch_rows(shard)
        budget = config.max_tokens_per_micro_batch
        if budget is None:
            plan = plan_step(rows, max_rows or rows, config.mini_batches, config.micro_batch_size)
            parts = functools.partial(counted_parts, shard, loss_tokens=config.loss_tokens)
            loss_fn = self.loss_fn
        else:
            lengths = sequence_lengths(shard)
            # Every rank runs as many micro-batches as the rank that needs the most.
            counts = token_step_counts(lengths, budget, config.mini_batches)
            plan = plan_token_step(lengths, budget, config.mini_batches, self.agree_max(counts))
            parts = functools.partial(
                counted_packed_parts, shard, loss_tokens=config.loss_tokens, lengths=lengths
            )
            loss_fn = _packed_loss(self.loss_fn)
        counted = [parts(step) for step in plan]
        # Each step's loss tokens over every rank: the step is the mean over all of them,
        # however the batch was sharded (DeepSpeed averages the ranks' gradients).
        totals = self.agree_sum([sum(t for _, t in step) for step in counted])
        steps = [
            weigh_parts(step, total, self.world_size)
            for step, total in zip(counted, totals, strict=True)
        ]
        results = []
        detail = {"rows": rows, "optimizer_steps": len(plan) * config.epochs}
        with self._record(span, micro_batches=sum(map(len, plan)), **detail):
            for _ in range(config.epochs):
                for micro in steps:
                    loss, metrics = self.backend.step(loss_fn, micro, self._after_forward)
                    results.append({"loss": loss, **metrics, **_shape_metrics(micro)})
        self.steps += 1
        return results

    def agree_max(self, counts: list[int]) -> list[int]:
        """The element-wise maximum of ``counts`` over this group's ranks (all at once)."""
        return [int(v) for v in self.backend.all_reduce(counts, "max")]

    def agree_sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of ``values`` over this group's ranks (all at once)."""
        return self.backend.all_reduce(values, "sum")

    # ----- memory -----------------------------------------------------------------------------

    def offload(self, keep_params: bool, span: str | None = None) -> TrainerMemory:
        """Moves training state to host memory; with ``keep_params`` the params stay resident.

        Idempotent: a state already as far offloaded moves nothing.
        """
        target = TrainerMemory.PARAMS if keep_params else TrainerMemory.OFFLOADED
        if _ORDER.index(self.memory) <= _ORDER.index(target):
            return self.memory
        with self._record(span):
            self.backend.offload(keep_params)
        self.memory = target
        return self.memory

    def reload(self, span: str | None = None) -> TrainerMemory:
        """Brings every offloaded state back to the device. Idempotent."""
        if self.memory is not TrainerMemory.FULL:
            with self._record(span):
                self.backend.reload()
            self.memory = TrainerMemory.FULL
        return self.memory

    # ----- state ------------------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Checkpoints model, optimizer and step count under ``path`` (all ranks at once)."""
        self.backend.save(path, self.steps)
        return path

    def load(self, path: str) -> int:
        """Restores a checkpoint written by :meth:`save`; returns the step count."""
        self.steps = self.backend.load(path)
        return self.steps

    def require(self, memory: TrainerMemory, action: str) -> None:
        """Raises unless started and in ``memory`` (an action never runs on moved state)."""
        if not self.started:
            raise ActorStateError(f"{self.name}: {action} before start")
        if self.memory is not memory:
            raise ActorStateError(
                f"{self.name}: {action} needs memory state {memory.value}, "
                f"it is {self.memory.value}"
            )

    def shutdown(self) -> None:
        """Leaves the group, drops model and optimizer, closes the store it hosts. Idempotent."""
        if self._hosted is not None:
            self._hosted[1].close()
            self._hosted = None
        self.backend.shutdown()
        self.started = False
        self._prepared = None
        self._store = None

    def _record(self, span: str | None, **detail: Any) -> AbstractContextManager[dict]:
        return self._span(span, **detail) if span else _no_span("", **detail)
