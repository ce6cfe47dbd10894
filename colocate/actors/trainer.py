"""The trainer actor: one trainer rank of the policy, around a :class:`RankTrainer`.

It implements :class:`colocate.core.contract.TrainerTenant`: every method is an idempotent
mechanism; the coordinator decides when each runs and calls collectives (start, train_step,
send_weights under ZeRO-3, save/load) on every rank at once. The model, optimizer, group, train
loop, memory moves and checkpoints are the rank trainer's (``colocate.actors.training``, shared
with the critic); this actor adds the protocol's side: timeline spans, faults, and the weight
sync's stores and sender.
"""

from __future__ import annotations

import torch

from colocate.actors.trainer_backend import TrainerBackend
from colocate.actors.training import LossFn, RankTrainer, node_address
from colocate.algorithms.batches import batch_rows, shard_batch
from colocate.algorithms.metrics import merge_metrics
from colocate.core.config import TrainerConfig
from colocate.core.contract import Seat, TrainerTenant
from colocate.core.errors import ActorStateError
from colocate.core.faults import Fault, coerce_fault
from colocate.core.phases import TrainerMemory
from placement import TenantKind

__all__ = ["TrainerActor", "LossFn", "shard_batch", "batch_rows"]

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
        self.rank = seat.rank
        self.world_size = seat.world_size
        self.training = RankTrainer(
            config,
            seat,
            seat.loss_fn,
            self.load_model,
            self.span,
            after_forward=lambda: self._maybe_crash(Fault.CRASH_IN_TRAIN_STEP),
        )
        self._sender = None
        self._stores: dict[str, tuple] = {}  # rendezvous key -> (store, listening socket)

    @property
    def backend(self) -> TrainerBackend:
        """The rank's backend (model and optimizer)."""
        return self.training.backend

    @property
    def memory(self) -> TrainerMemory:
        """What this rank holds on its device."""
        return self.training.memory

    @property
    def steps(self) -> int:
        """Train calls taken (restored by :meth:`load`)."""
        return self.training.steps

    # ----- start-up ---------------------------------------------------------------------------

    def node_address(self, multi_node: bool) -> str:
        """The address this rank's listeners bind to: loopback unless peers are on other nodes."""
        return node_address(multi_node)

    def host_group_store(self, multi_node: bool, timeout_s: float) -> tuple[str, int]:
        """Starts the trainer group's store on rank 0, bound to one address; returns it."""
        return self.training.host_group_store(multi_node, timeout_s)

    def prepare(self, master: tuple[str, int], timeout_s: float) -> dict:
        """The memory-free part of :meth:`start` (all ranks at once). Idempotent.

        Loads DeepSpeed's ops, imports what the model build needs and joins the trainer group
        (:meth:`RankTrainer.prepare`): nothing on the device, so the coordinator runs it while
        the engines start.

        Returns:
            Seconds each part took (``ops_s``, ``imports_s``, ``group_s``), as recorded in
            the ``trainer.prepare`` span.
        """
        return self.training.prepare(master, timeout_s, span="trainer.prepare")

    def start(self, master: tuple[str, int], timeout_s: float) -> dict:
        """Builds the model and optimizer on the device (all ranks at once). Idempotent.

        Prepares first (:meth:`prepare`) if the coordinator has not had it done already.
        """
        self.prepare(master, timeout_s)
        return self.training.start(master, timeout_s, span="trainer.start")

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
        return self.training.describe()

    # ----- training ---------------------------------------------------------------------------

    def train_step(self, shard: dict, max_rows: int | None = None) -> dict[str, float]:
        """The optimizer steps of one train call on this rank's shard (all ranks at once).

        The coordinator cuts the batch with :func:`shard_batch`, so each rank receives only
        its own rows, and passes the largest rank's rows; the steps are
        :meth:`RankTrainer.train`'s.

        Returns:
            The loss and the loss function's metrics, means over the optimizer steps (maxima
            for ``*_max`` metrics, ``colocate.algorithms.metrics``); with
            more than one step also ``first_<name>`` (the first step's, taken before any
            update: e.g. the training-inference log-prob difference) and ``optimizer_steps``.
        """
        rows = self.training.train(shard, max_rows, span="trainer.train_step")
        out = merge_metrics(rows)
        if len(rows) > 1:
            out.update({f"first_{k}": v for k, v in rows[0].items()})
            out["optimizer_steps"] = float(len(rows))
        return out

    # ----- memory -----------------------------------------------------------------------------

    def offload(self, keep_params: bool) -> TrainerMemory:
        """Moves training state to host memory; with ``keep_params`` the params stay resident.

        ``keep_params=True`` is the TRAIN -> SYNC release (grads and optimizer states go; the
        params are about to be sent); ``False`` offloads everything (SYNC -> ROLLOUT).
        """
        span = "trainer.offload" if keep_params else "trainer.offload_params"
        return self.training.offload(keep_params, span=span)

    def reload(self) -> TrainerMemory:
        """Brings every offloaded state back to the device."""
        return self.training.reload(span="trainer.reload")

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
        return self.training.save(path)

    def load(self, path: str) -> int:
        """Loads a checkpoint saved by :meth:`save`; returns the restored step count."""
        return self.training.load(path)

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
        self.training.shutdown()
