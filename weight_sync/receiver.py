"""The receiving side, inside every vLLM worker, as a worker extension (``worker_extension_cls``).

Why an extension rather than a backend of vLLM 0.32's weight-transfer API: the extension is
reached through ``collective_rpc`` in-process and in multi-process (TP) executors alike, needs
no plugin registration inside worker processes, and lets one call stream every bucket with the
next receive posted before the current apply (the API drives one ``update_weights`` RPC per
chunk). Both apply through the same layer-wise reload machinery.

Per sync, in each worker: open one layer-wise reload session; run
:func:`weight_sync.stream.receive_stream`, whose apply hook fingerprints what arrived (if
verifying) and ``load_weights`` it (vLLM's own weight loaders shard it for this TP rank, fuse
q/k/v and gate/up, and repack on CPU); close the session. Only metadata arrives by RPC.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass, field

import torch

from weight_sync.buckets import BucketPlan
from weight_sync.errors import WeightSyncError
from weight_sync.factory import make_receiver
from weight_sync.fingerprint import Fingerprint, compare, fingerprint
from weight_sync.stream import manifest_key, receive_stream
from weight_sync.transport import ReceiverTransport, Rendezvous

__all__ = [
    "ReceiverSetup",
    "SyncRequest",
    "ReceiveReport",
    "ReceiveFaults",
    "WeightSyncWorkerExtension",
    "EXTENSION_QUALNAME",
]

_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload"


def _silence_reload_logs() -> None:
    """Raises vLLM's reload loggers to ERROR.

    vLLM logs one warning per layer it is not given during a reload session (and one for the
    rotary embedding even on a full reload): tens of thousands of lines per sync on big
    models. vLLM sets a level on each of its loggers, so the children are set one by one.
    """
    for name in [_RELOAD_LOGGER, *logging.Logger.manager.loggerDict]:
        if name.startswith(_RELOAD_LOGGER):
            logging.getLogger(name).setLevel(logging.ERROR)


@dataclass(frozen=True)
class ReceiverSetup:
    """Sent once to every worker of an engine.

    Attributes:
        rendezvous: The group each TP rank joins (index = TP rank): on CUDA, TP ranks that
            share a GPU with different trainer ranks join different CUDA IPC groups.
        group_ranks: Group rank of each TP rank of this engine (index = TP rank).
        plan: The bucket layout every sync follows.
        engine: The engine's name, for error messages (``"engine1"``).
    """

    rendezvous: tuple[Rendezvous, ...]
    group_ranks: tuple[int, ...]
    plan: BucketPlan
    engine: str = "engine"


@dataclass(frozen=True)
class SyncRequest:
    """Sent with every sync: the version the weights will carry, and whether to fingerprint.

    ``sequence`` numbers the syncs of one driver: it keys the sync's manifest, so a version
    number used twice on the same stores (a resumed run) never reads an older manifest.
    """

    version: int
    verify: bool = True
    sequence: int = 0


@dataclass(frozen=True)
class ReceiveFaults:
    """Faults a test arms in a worker's receiver (``colocate.core.faults.Fault`` maps onto these).

    Attributes:
        corrupt_next_bucket: Flip bytes of the next bucket received, as a bad link would.
        exit_after_first_bucket: End the worker's process after applying the first bucket of
            the next sync, as a kill in the middle of a transfer would.
    """

    corrupt_next_bucket: bool = False
    exit_after_first_bucket: bool = False


@dataclass
class ReceiveReport:
    """What one worker received in one sync."""

    version: int
    tp_rank: int
    bytes_received: int = 0
    seconds: float = 0.0
    wait_s: float = 0.0
    apply_s: float = 0.0
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    applied: dict[str, Fingerprint] = field(default_factory=dict)
    sent: dict[str, Fingerprint] | None = None  # the sender's manifest (TP rank 0 only)
    verified: int = 0  # received tensors compared with the manifest


class _State:
    def __init__(self, setup: ReceiverSetup, tp_rank: int, transport: ReceiverTransport):
        self.setup = setup
        self.tp_rank = tp_rank
        self.transport = transport
        self.faults = ReceiveFaults()


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class; its methods are called with ``llm.collective_rpc``."""

    def ws_setup(self, setup: ReceiverSetup) -> dict:
        """Joins the transfer group; must run concurrently with the sender's setup."""
        from vllm.distributed import get_tensor_model_parallel_rank

        self.ws_teardown()
        tp_rank = get_tensor_model_parallel_rank()
        rank = setup.group_ranks[tp_rank]
        transport = make_receiver(
            setup.rendezvous[tp_rank], rank, setup.plan.max_bucket_bytes, torch.device(self.device)
        )
        self._ws_state = _State(setup, tp_rank, transport)
        return {"tp_rank": tp_rank, "group_rank": rank}

    def ws_receive(self, request: SyncRequest) -> ReceiveReport:
        """Receives and applies every bucket of the plan (see the module docstring)."""
        from vllm.config import set_current_vllm_config

        state = self._ws_require()
        _silence_reload_logs()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            report = self._ws_stream(state, request)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            # What vLLM's own reload_weights resets after loading, minus the prefix cache,
            # which lives in the scheduler: the engine actor resets it.
            getattr(self.model_runner, reset, lambda: None)()
        if request.verify:
            report.applied = self.ws_applied_fingerprints()
            self._ws_verify(state, request, report)
        return report

    def _ws_verify(self, state: _State, request: SyncRequest, report: ReceiveReport) -> None:
        """Compares what arrived with the sender's manifest (it came through the transport)."""
        sent = pickle.loads(state.transport.fetch(manifest_key(request.version, request.sequence)))
        where = f"{state.setup.engine} worker tp{state.tp_rank} (version {request.version})"
        compare(sent, report.fingerprints, where=where)
        report.verified = len(report.fingerprints)
        report.sent = sent if state.tp_rank == 0 else None

    def _ws_stream(self, state: _State, request: SyncRequest) -> ReceiveReport:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        model = self.model_runner.model
        report = ReceiveReport(version=request.version, tp_rank=state.tp_rank)
        faults, state.faults = state.faults, ReceiveFaults()  # each armed fault fires once

        def apply(bucket, buffer) -> None:
            if faults.corrupt_next_bucket and bucket.index == 0:
                buffer[: bucket.nbytes : 4099].add_(1)  # flip a few bytes, as a bad link would
            views = bucket.views(buffer)
            if request.verify:
                report.fingerprints.update((n, fingerprint(v)) for n, v in views)
            model.load_weights(iter(views))
            _detach_pending_loads(buffer)
            if faults.exit_after_first_bucket:
                os._exit(1)  # fault injection: die mid-transfer, as a killed worker would

        start = time.perf_counter()
        ties = _tied_modules(model)
        initialize_layerwise_reload(model)
        try:
            stats = receive_stream(state.setup.plan.buckets, state.transport, apply)
            report.bytes_received = stats.bytes
            report.wait_s = stats.wait_s
            report.apply_s = stats.work_s
        finally:
            t0 = time.perf_counter()
            finalize_layerwise_reload(model, self.model_runner.model_config)
            _retie(model, ties)
            report.apply_s += time.perf_counter() - t0
        report.seconds = time.perf_counter() - start
        return report

    def ws_applied_fingerprints(self) -> dict[str, Fingerprint]:
        """Fingerprints of the applied parameters that are readable on this platform.

        On CUDA every parameter is readable. The CPU backend repacks linear weights into
        opaque kernels (their parameters read as shape [0]); those are skipped here, and what
        the worker received is fingerprinted instead.
        """
        out = {}
        for name, param in self.model_runner.model.named_parameters():
            if param.numel() > 0:
                out[name] = fingerprint(param.data)
        return out

    def ws_packing(self) -> tuple:
        """``(Packing, parameter names)`` of this worker's model, read from the model itself."""
        from weight_sync.packing import packing_of_vllm_model

        model = self.model_runner.model
        return packing_of_vllm_model(model), tuple(n for n, _ in model.named_parameters())

    def ws_arm(self, faults: ReceiveFaults) -> None:
        """Arms faults for the next sync (test hook)."""
        self._ws_require().faults = faults

    def ws_teardown(self) -> None:
        """Leaves the group and frees the receive buffers. Idempotent."""
        state = getattr(self, "_ws_state", None)
        if state is not None:
            state.transport.close()
            self._ws_state = None

    def _ws_require(self) -> _State:
        state = getattr(self, "_ws_state", None)
        if state is None:
            raise WeightSyncError("weight sync is not set up on this worker; call ws_setup first")
        return state


def _tied_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(module, owner)`` names: a module whose ``weight`` is another module's (tied embeddings).

    The checkpoint has no tensor of its own for such a module (``lm_head`` under
    ``tie_word_embeddings``), so the layer-wise reload never processes it.
    """
    owners: dict[int, str] = {}
    ties = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) in owners:
            ties.append((name, owners[id(weight)]))
        else:
            owners[id(weight)] = name
    return ties


def _retie(model: torch.nn.Module, ties: list[tuple[str, str]]) -> None:
    """Points each tied module at its owner's new weight and redoes its post-load processing.

    Without this a tied ``lm_head`` keeps what it was built from: on CPU its repacked GEMM
    weight (``cpu_linear``, packed from the old values) computes the logits of the weights
    before the sync. Measured on the tiny Qwen2 with tied embeddings: different greedy tokens
    than an engine loaded from the same weights.
    """
    for name, owner in ties:
        module, source = model.get_submodule(name), model.get_submodule(owner)
        if module.weight is not source.weight:
            module.weight = source.weight
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


def _detach_pending_loads(buffer: torch.Tensor) -> None:
    """Copies out tensors that vLLM holds, unprocessed, as views of our receive buffer.

    A layer whose parameter has padding (e.g. a vocabulary padded to a multiple of 64) never
    reaches its full element count, so vLLM defers it to the end of the session while holding
    views of the receive buffer, which the next bucket overwrites. Those few tensors are
    cloned; complete layers were already copied into their parameters.
    """
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    lo = buffer.data_ptr()
    hi = lo + buffer.numel() * buffer.element_size()
    for info in LAYERWISE_INFO.values():
        for _, bound in info.loaded_weights:
            for key, value in bound.arguments.items():
                if (
                    key != "param"
                    and isinstance(value, torch.Tensor)
                    and lo <= value.data_ptr() < hi
                ):
                    bound.arguments[key] = value.clone()


#: The ``worker_extension_cls`` vLLM is given (it imports the class in every worker).
EXTENSION_QUALNAME = f"{__name__}.{WeightSyncWorkerExtension.__qualname__}"
