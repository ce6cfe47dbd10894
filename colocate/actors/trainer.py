"""The trainer actor: one trainer rank, around a backend (DeepSpeed ZeRO, or plain torch).

It implements :class:`colocate.core.contract.TrainerTenant`: every method is an idempotent
mechanism; the coordinator decides when each runs and calls collectives (start, train_step,
send_weights under ZeRO-3, save/load) on every rank at once. The model and optimizer belong to
the backend (``colocate.actors.trainer_backend``); this actor keeps the protocol's side: memory
state, timeline spans, faults, and the weight sync's stores and sender.
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from colocate.actors.backends import make_backend
from colocate.actors.cpu.ds_ops import op_environment, prepare_ops
from colocate.actors.trainer_backend import TrainerBackend
from colocate.algorithms.batches import batch_rows, shard_batch, weighted_parts
from colocate.algorithms.metrics import merge_metrics
from colocate.algorithms.micro_batches import plan_step
from colocate.core.config import TrainerConfig
from colocate.core.contract import Seat, TrainerTenant
from colocate.core.errors import ActorStateError
from colocate.core.faults import Fault, coerce_fault
from colocate.core.phases import TrainerMemory
from placement import TenantKind

__all__ = ["TrainerActor", "LossFn", "shard_batch", "batch_rows"]

#: ``loss_fn(model, batch) -> (loss, metrics)``: ``model`` is callable like the HF model (the
#: DeepSpeed engine forwards to it), ``batch`` is this rank's shard, ``metrics`` plain floats.
LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]]

_ORDER = (TrainerMemory.OFFLOADED, TrainerMemory.PARAMS, TrainerMemory.FULL)
#: Default bytes gathered at once by fingerprints and exports (the coordinator passes the
#: sync's bucket size).
_CHUNK_BYTES = 256 << 20


class TrainerActor(TrainerTenant):
    """One trainer rank.

    Args:
        seat: Its seat: ``config`` the :class:`TrainerConfig` (shared by all ranks), ``rank``
            and ``world_size`` of the trainer group, ``lanes`` its GPU, ``loss_fn`` the user's
            loss, ``env`` the environment set before DeepSpeed is imported.
    """

    def __init__(self, seat: Seat):
        super().__init__(seat)  # sets the environment first
        config: TrainerConfig = seat.config
        rank, world_size, loss_fn = seat.rank, seat.world_size, seat.loss_fn
        # This environment's own ninja and extension cache (colocate.actors.cpu.ds_ops): never a
        # rebuild.
        os.environ.update(op_environment())
        # DeepSpeed calls torch.distributed APIs that torch has deprecated: one FutureWarning
        # per call, per step, per rank. They say nothing about this run.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        self.rank = rank
        self.world_size = world_size
        self.loss_fn = loss_fn
        self.memory = TrainerMemory.FULL
        self.backend: TrainerBackend = make_backend(config, rank, world_size, self.load_model)
        self.started = False
        self._prepared: dict | None = None  # what prepare() did, once it has
        self._store = None  # this rank's handle on the trainer group's store (prepare)
        self.steps = 0
        self._sender = None
        self._group_store: tuple | None = None
        self._stores: dict[str, tuple] = {}  # rendezvous key -> (store, listening socket)

    # ----- start-up ---------------------------------------------------------------------------

    def node_address(self, multi_node: bool) -> str:
        """The address this rank's listeners bind to: loopback unless peers are on other nodes."""
        if not multi_node:
            return "127.0.0.1"
        import ray

        return ray.util.get_node_ip_address()

    def host_group_store(self, multi_node: bool, timeout_s: float) -> tuple[str, int]:
        """Starts the trainer group's store on rank 0, bound to one address; returns it.

        torch's own env:// rendezvous would listen on every interface; this one listens on
        :meth:`node_address` only (loopback on a single node).
        """
        from weight_sync.store import host_store

        host = self.node_address(multi_node)
        store, port, sock = host_store(host, self.world_size, timeout_s, key="trainer-group")
        self._group_store = (store, sock)
        return host, port

    def prepare(self, master: tuple[str, int], timeout_s: float) -> dict:
        """The memory-free part of :meth:`start` (all ranks at once). Idempotent.

        Loads DeepSpeed's ops (built by the set-up; loaded, never hung, here), imports what
        the model build needs and joins the trainer group (``TrainerBackend.prepare``):
        nothing on the device, so the coordinator runs it while the engines start.

        Returns:
            Seconds each part took (``ops_s``, ``imports_s``, ``group_s``), as recorded in
            the ``trainer.prepare`` span.
        """
        if self._prepared is not None:
            return self._prepared
        with self.span("trainer.prepare") as detail:
            t0 = time.perf_counter()
            if self.config.deepspeed:
                prepare_ops(timeout_s)
            detail["ops_s"] = time.perf_counter() - t0
            self._store = self._trainer_group_store(master, timeout_s)
            detail.update(self.backend.prepare(self._store, master, timeout_s))
        self._prepared = dict(detail)
        return self._prepared

    def start(self, master: tuple[str, int], timeout_s: float) -> dict:
        """Builds the model and optimizer on the device (all ranks at once). Idempotent.

        Prepares first (:meth:`prepare`) if the coordinator has not had it done already.
        """
        if self.started:
            return self.describe()
        self.prepare(master, timeout_s)
        with self.span("trainer.start"):
            torch.manual_seed(self.config.seed)
            self.backend.start(self._store, master, timeout_s)
            # DeepSpeed's offload_states ends in gc.collect(), which walks every object the
            # imports and the model created (a large share of a step on CPU: docs/design.md,
            # section 8a): move them out of the collector's way once they exist.
            gc.freeze()
        self.started = True
        self.memory = TrainerMemory.FULL
        return self.describe()

    def _trainer_group_store(self, master: tuple[str, int], timeout_s: float):
        if self.rank == 0:
            return self._group_store[0] if self._group_store else None
        from weight_sync.store import join_store

        return join_store(master[0], master[1], self.world_size, timeout_s, "trainer-group")

    def load_model(self) -> torch.nn.Module | None:
        """The starting model (fp32 master weights), or None: the backend loads ``config.model``.

        None (the default) lets the backend load the local HF directory its own way: under
        ZeRO-3 partitioned, each rank reading only its share (``colocate.actors.partitioned_load``),
        else in full. Override in a subclass to build the model another way; called once, by
        ``start``.
        """
        return None

    def describe(self) -> dict:
        """Rank, backend, ZeRO stage, optimizer class and parameter count."""
        return self.backend.describe()

    # ----- training ---------------------------------------------------------------------------

    def train_step(self, shard: dict, max_rows: int | None = None) -> dict[str, float]:
        """The optimizer steps of one train call on this rank's shard (all ranks at once).

        The coordinator cuts the batch with :func:`shard_batch`, so each rank receives only
        its own rows. Steps: for each of ``config.epochs`` passes, for each of
        ``config.mini_batches`` parts of the shard, one optimizer step accumulated over
        micro-batches of at most ``config.micro_batch_size`` rows, each weighted by its share
        of the part's loss tokens (``colocate.algorithms.micro_batches``).

        Returns:
            The loss and the loss function's metrics, means over the optimizer steps (maxima
            for ``*_max`` metrics, ``colocate.algorithms.metrics``); with
            more than one step also ``first_<name>`` (the first step's, taken before any
            update: e.g. the training-inference log-prob difference) and ``optimizer_steps``.
        """
        self._require(TrainerMemory.FULL, "train_step")
        config = self.config
        rows = batch_rows(shard)
        plan = plan_step(rows, max_rows or rows, config.mini_batches, config.micro_batch_size)
        results = []
        with self.span("trainer.train_step", rows=rows, optimizer_steps=len(plan) * config.epochs):
            for _ in range(config.epochs):
                for step in plan:
                    micro = weighted_parts(shard, step, config.loss_tokens)
                    results.append(self.backend.step(self.loss_fn, micro, self._after_forward))
        self.steps += 1
        rows_out = [{"loss": loss, **metrics} for loss, metrics in results]
        out = merge_metrics(rows_out)
        if len(rows_out) > 1:
            out.update({f"first_{k}": v for k, v in rows_out[0].items()})
            out["optimizer_steps"] = float(len(rows_out))
        return out

    def _after_forward(self) -> None:
        self._maybe_crash(Fault.CRASH_IN_TRAIN_STEP)  # armed faults fire once

    # ----- memory -----------------------------------------------------------------------------

    def offload(self, keep_params: bool) -> TrainerMemory:
        """Moves training state to host memory; with ``keep_params`` the params stay resident.

        ``keep_params=True`` is the TRAIN -> SYNC release (grads and optimizer states go; the
        params are about to be sent); ``False`` offloads everything (SYNC -> ROLLOUT).
        """
        target = TrainerMemory.PARAMS if keep_params else TrainerMemory.OFFLOADED
        if _ORDER.index(self.memory) <= _ORDER.index(target):
            return self.memory
        with self.span("trainer.offload" if keep_params else "trainer.offload_params"):
            self.backend.offload(keep_params)
        self.memory = target
        return self.memory

    def reload(self) -> TrainerMemory:
        """Brings every offloaded state back to the device."""
        if self.memory is not TrainerMemory.FULL:
            with self.span("trainer.reload"):
                self.backend.reload()
            self.memory = TrainerMemory.FULL
        return self.memory

    # ----- weight sync ------------------------------------------------------------------------

    def weight_metas(self, dtype: torch.dtype) -> list:
        """Names, full shapes and the engine dtype of every weight to send."""
        return self.backend.weight_source().metas(dtype)

    def host_sync_store(self, host: str, world_size: int, key: str, timeout_s: float) -> int:
        """Starts the transfer group's store on this rank; returns its port."""
        from weight_sync.store import host_store

        store, port, sock = host_store(host, world_size, timeout_s, key)
        self._stores[key] = (store, sock)
        return port

    def setup_sync(self, plan, rendezvous: list) -> bool:
        """Builds this rank's sender over the given rendezvous (concurrently with receivers).

        A rank with no rendezvous still takes part in ZeRO-3 gathers during every sync.
        """
        from weight_sync.factory import make_sender
        from weight_sync.sender import WeightSender

        self.teardown_sync()
        device = self.backend.device
        sender = WeightSender(self.backend.weight_source(), plan, device)
        buffers = sender.allocate_buffers() if rendezvous else ()
        for rdv in rendezvous:
            store, _ = self._stores[rdv.key]
            sender.transports.append(make_sender(rdv, store, buffers, device))
        self._sender = sender
        return True

    def send_weights(self, request):
        """Streams every bucket (see ``weight_sync.sender``); returns this rank's report."""
        if self._sender is None:
            raise ActorStateError(f"{self.name}: weight sync is not set up")
        if self.memory is TrainerMemory.OFFLOADED:
            raise ActorStateError(f"{self.name}: params are offloaded; reload before a sync")
        with self.span("trainer.send_weights", version=request.version):
            return self._sender.send(
                request.version,
                verify=request.verify,
                sequence=request.sequence,
                after_bucket=lambda _: self._maybe_crash(Fault.CRASH_IN_SEND),
            )

    def teardown_sync(self) -> None:
        """Closes the sender (the stores stay for a re-setup). Idempotent."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def close_sync_stores(self) -> None:
        """Closes the stores this rank hosts (after :meth:`teardown_sync`)."""
        self.teardown_sync()
        for _, sock in self._stores.values():
            sock.close()
        self._stores = {}

    # ----- state ------------------------------------------------------------------------------

    def param_fingerprints(self, chunk_bytes: int = _CHUNK_BYTES) -> dict:
        """Fingerprints of every full parameter, as stored (all ranks at once under ZeRO-3).

        Gathered ``chunk_bytes`` at a time (``colocate.actors.export``), never the whole model.
        """
        from colocate.actors.export import stream_fingerprints

        return stream_fingerprints(self.backend.weight_source(), chunk_bytes)

    def save(self, path: str) -> str:
        """Saves a checkpoint (model, optimizer, step) under ``path`` (all ranks at once)."""
        self.backend.save(path, self.steps)
        return path

    def load(self, path: str) -> int:
        """Loads a checkpoint saved by :meth:`save`; returns the restored step count."""
        self.steps = self.backend.load(path)
        return self.steps

    def export_hf(
        self, path: str, dtype: str = "bfloat16", chunk_bytes: int = _CHUNK_BYTES
    ) -> str | None:
        """Writes the current weights as an HF model directory (rank 0 writes; all ranks call).

        Streamed: one chunk of at most ``chunk_bytes`` gathered, cast and written as one
        safetensors shard at a time (``colocate.actors.export``); then config and tokenizer.
        """
        from colocate.actors.export import stream_export

        module = self.backend.module
        write = self.rank == 0
        source = self.backend.weight_source()
        stream_export(source, module, path, getattr(torch, dtype), chunk_bytes, write)
        if not write:
            return None
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(self.config.model).save_pretrained(path)
        return path

    def status(self) -> dict:
        """Memory state, steps, pid, RSS, open fds and threads (health and soak)."""
        from colocate.operations.memory import process_stats

        return {
            "name": self.name,
            "memory": self.memory.value,
            "steps": self.steps,
            **process_stats(),
        }

    def inject_fault(self, fault: Fault) -> None:
        """Arms a trainer fault (test hook; see :class:`colocate.core.faults.Fault`).

        ``CRASH_IN_TRAIN_STEP`` (after the forward) or ``CRASH_IN_SEND`` (after the first
        bucket): the process exits there, as a kill would.
        """
        fault = coerce_fault(fault)
        if fault.kind is not TenantKind.TRAINER:
            raise ValueError(f"{self.name}: {fault.value} is a {fault.kind.value} fault")
        self._faults.add(fault)

    def shutdown(self) -> None:
        """Closes the sync, the trainer group and the group's store."""
        self.close_sync_stores()
        if self._group_store is not None:
            self._group_store[1].close()
            self._group_store = None
        self.backend.shutdown()
        self.started = False
        self._prepared = None
        self._store = None

    def _require(self, memory: TrainerMemory, action: str) -> None:
        if not self.started:
            raise ActorStateError(f"{self.name}: {action} before start")
        if self.memory is not memory:
            raise ActorStateError(
                f"{self.name}: {action} needs memory state {memory.value}, "
                f"it is {self.memory.value}"
            )
