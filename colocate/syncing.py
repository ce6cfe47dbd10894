"""Driving a weight sync across the fleet: group set-up, the transfer, and its verification.

The coordinator decides when; this module does the sync's own steps in order. Set-up: (1) the
trainer's weights, as the engine will receive them, are checked against what the engine's
model expects (names and shapes), before a byte moves; (2) buckets are planned; (3) transfer
groups follow the placement (``weight_sync.groups``), each sender hosting its group's store;
(4) senders and receivers build the groups concurrently. Transfer: every trainer rank sends
(ZeRO-3 ranks all take part in the gathers) while every engine receives and applies; then the
fingerprints of what every worker received, and of the applied parameters it can read, are
compared with what was sent.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from colocate.calls import wait_all
from colocate.config import ConfigError, EngineConfig, SyncConfig
from colocate.fleet import Fleet
from weight_sync.buckets import BucketPlan, default_bucket_bytes, plan_buckets
from weight_sync.fingerprint import compare
from weight_sync.groups import Receiver, plan_transfer_groups
from weight_sync.receiver import ReceiverSetup, SyncRequest
from weight_sync.transport import Backend, Rendezvous
from weight_sync.verify import check_applied

__all__ = ["SyncReport", "SyncDriver", "check_compatible"]


@dataclass
class SyncReport:
    """One weight sync as the coordinator saw it."""

    version: int
    seconds: float
    bytes: int
    buckets: int
    verified_tensors: int
    applied_checked: int
    sender: dict = field(default_factory=dict)
    receivers: list = field(default_factory=list)


def check_compatible(sent: list, expected: list) -> None:
    """Raises :class:`ConfigError` if the trainer's weights cannot load into the engine's model.

    Args:
        sent: ``TensorMeta`` of every tensor the trainer would send.
        expected: ``TensorMeta`` of every checkpoint tensor the engine's model declares.
    """
    have = {m.name: m for m in sent}
    want = {m.name: m for m in expected}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if extra:
        raise ConfigError(
            f"trainer weight {extra[0]!r} (and {len(extra) - 1} more) does not exist in the "
            "engine's model; fix: give the trainer and the engine the same architecture"
        )
    if missing:
        raise ConfigError(
            f"engine weight {missing[0]!r} (and {len(missing) - 1} more) is not in the trainer's "
            "model, so it would never be updated; fix: give both the same architecture"
        )
    for name, m in have.items():
        if tuple(m.shape) != tuple(want[name].shape):
            raise ConfigError(
                f"weight {name!r} has shape {tuple(m.shape)} in the trainer but "
                f"{tuple(want[name].shape)} in the engine's model; fix: give both the same config"
            )


class SyncDriver:
    """Set-up and transfer of weight syncs for one fleet."""

    def __init__(
        self,
        fleet: Fleet,
        engine_config: EngineConfig,
        sync_config: SyncConfig,
        device_type: str,
        step_timeout_s: float,
        run_name: str,
    ):
        self.fleet = fleet
        self.engine_config = engine_config
        self.sync_config = sync_config
        self.device_type = device_type
        self.timeout_s = step_timeout_s
        self.run_name = run_name
        self.bucket_plan: BucketPlan | None = None
        self.rendezvous: list[Rendezvous] = []

    def setup(self, tag: tuple[str, int]) -> BucketPlan:
        """Checks compatibility, plans buckets and (re)builds every transfer group."""
        fleet, spec = self.fleet, self.fleet.plan.spec
        t = spec.trainer_world_size
        wait_all(
            [fleet.trainer_call(r, "close_sync_stores") for r in range(t)], tag, self.timeout_s
        )
        dtype = self.engine_config.dtype.torch
        sent, expected = wait_all(
            [
                fleet.trainer_call(0, "weight_metas", dtype),
                fleet.engine_call(0, "expected_weights"),
            ],
            tag,
            self.timeout_s,
        )
        check_compatible(sent, expected)
        size = self.sync_config.bucket_bytes or default_bucket_bytes(self.device_type)
        self.bucket_plan = plan_buckets(sent, size)
        groups = plan_transfer_groups(fleet.plan, self.device_type)
        run_key = f"{self.run_name}-{uuid.uuid4().hex[:8]}"
        rdvs = []
        for i, g in enumerate(groups):
            # Loopback unless a collective group spans nodes (an IPC group never does).
            host = "127.0.0.1"
            if spec.nodes > 1 and g.backend is not Backend.CUDA_IPC:
                host = wait_all(
                    [fleet.trainer_call(g.sender_rank, "node_address", True)], tag, self.timeout_s
                )[0]
            key = f"{run_key}-g{i}"
            port = wait_all(
                [
                    fleet.trainer_call(
                        g.sender_rank,
                        "host_sync_store",
                        host,
                        g.world_size,
                        key,
                        self.sync_config.timeout_s,
                    )
                ],
                tag,
                self.timeout_s,
            )[0]
            rdvs.append(
                Rendezvous(host, port, g.world_size, key, self.sync_config.timeout_s, g.backend)
            )
        calls = [
            fleet.trainer_call(
                r,
                "setup_sync",
                self.bucket_plan,
                [rdv for g, rdv in zip(groups, rdvs, strict=True) if g.sender_rank == r],
            )
            for r in range(t)
        ]
        for e in range(spec.engines):
            per_tp = []
            for tp in range(spec.engine_tp):
                receiver = Receiver(e, tp)
                g, rdv = next(
                    (g, rdv) for g, rdv in zip(groups, rdvs, strict=True) if receiver in g.receivers
                )
                per_tp.append((rdv, g.rank_of(receiver)))
            setup = ReceiverSetup(
                tuple(r for r, _ in per_tp), tuple(k for _, k in per_tp), self.bucket_plan
            )
            calls.append(fleet.engine_call(e, "setup_sync", setup))
        wait_all(calls, tag, self.timeout_s)
        self.rendezvous = rdvs
        return self.bucket_plan

    def transfer(self, version: int, tag: tuple[str, int]) -> SyncReport:
        """Streams the weights to every engine and verifies them (if configured)."""
        fleet, spec = self.fleet, self.fleet.plan.spec
        verify = self.sync_config.verify
        request = SyncRequest(version=version, verify=verify)
        t = spec.trainer_world_size
        calls = [fleet.trainer_call(r, "send_weights", request, tag) for r in range(t)]
        calls += [
            fleet.engine_call(e, "receive_weights", request, tag) for e in range(spec.engines)
        ]
        start = time.perf_counter()
        results = wait_all(calls, tag, self.timeout_s)
        seconds = time.perf_counter() - start
        senders, received = results[:t], results[t:]
        # Every sending rank fingerprints the same full tensors; rank 0 always sends.
        sent = next((s for s in senders if s.bytes_sent), senders[0])
        checked = applied = 0
        if verify:
            for e, reports in enumerate(received):
                for w in reports:
                    compare(
                        sent.fingerprints,
                        w.fingerprints,
                        where=f"engine{e} worker tp{w.tp_rank} (version {version})",
                    )
                    checked += len(w.fingerprints)
            for e, reports in enumerate(received):
                applied += check_applied(
                    sent.fingerprints,
                    [w.applied for w in reports],
                    self.bucket_plan.fused_groups,
                    where=f"engine{e} (version {version})",
                )
        return SyncReport(
            version=version,
            seconds=seconds,
            bytes=sent.bytes_sent,
            buckets=len(self.bucket_plan.buckets),
            verified_tensors=checked,
            applied_checked=applied,
            sender={
                "seconds": sent.seconds,
                "gather_s": sent.gather_s,
                "pack_s": sent.pack_s,
                "wait_s": sent.wait_s,
            },
            receivers=[
                [{"seconds": w.seconds, "wait_s": w.wait_s, "apply_s": w.apply_s} for w in reports]
                for reports in received
            ],
        )
