"""Driving a weight sync across the fleet: group set-up, the transfer, and its verification.

The coordinator decides when; this module does the sync's own steps in order. Set-up, in three
sequential driver rounds whatever the number of transfer groups: (1) every trainer rank closes
its old stores, and at once the trainer's weights (as the engine will receive them) and what
the engine's model expects are read, and the senders' node addresses where groups span nodes;
the two lists of weights are checked (names and shapes) before a byte moves, buckets are
planned, and transfer groups follow the placement (``weight_sync.groups``); (2) every sender
hosts its groups' stores, all at once; (3) senders and receivers build the groups
concurrently. Transfer (added to the coordinator's chain of calls): every trainer rank sends
(ZeRO-3 ranks all take part in the gathers) while every engine receives and applies; the
sender's manifest of fingerprints follows its buckets, every engine worker compares what it
received with it, each engine checks the applied parameters it can read, and only then takes
the new version.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from colocate.core.calls import Call, Chain, wait_all
from colocate.core.config import ConfigError, EngineConfig, SyncConfig
from colocate.core.contract import EngineTenant, Tag, TrainerTenant
from colocate.core.fleet import Fleet
from weight_sync.buckets import BucketPlan, default_bucket_bytes, plan_buckets
from weight_sync.errors import PackingError
from weight_sync.groups import Receiver, TransferGroup, plan_transfer_groups
from weight_sync.receiver import ReceiverSetup, SyncRequest
from weight_sync.transport import Backend, Rendezvous

__all__ = ["SyncReport", "SyncDriver", "TransferSteps", "check_compatible"]


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


@dataclass(frozen=True)
class TransferSteps:
    """Where one sync's calls sit in a :class:`~colocate.core.calls.Chain` (step indices)."""

    version: int
    sends: list[int]
    receives: list[int]


def check_compatible(sent: list, expected) -> None:
    """Raises if the trainer's weights cannot load into the engine's model.

    Args:
        sent: ``TensorMeta`` of every tensor the trainer would send.
        expected: The engine's ``weight_sync.EngineWeights``.

    Raises:
        ConfigError: A tensor on one side only, or of another shape.
        PackingError: An engine parameter that no sent tensor maps to under the engine's
            packing (a family whose fused parameters the sync does not know).
    """
    have = {m.name: m for m in sent}
    want = {m.name: m for m in expected.metas}
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
    packing = expected.packing
    uncovered = packing.uncovered([m.name for m in sent], expected.params)
    if uncovered:
        raise PackingError(
            f"engine model {packing.architecture}: parameter {uncovered[0]!r} (and "
            f"{len(uncovered) - 1} more) is built from checkpoint tensors its packing description "
            "(packed_modules_mapping, expert mappings) does not name, so a sync could not be "
            "planned or verified; fix: use a model family the sync supports (docs/design.md), "
            "or extend weight_sync.packing for this architecture"
        )


class SyncDriver:
    """Set-up and transfer of weight syncs for one fleet.

    Args:
        fleet: The actors (its ``device`` is the reservation's, from the bundles).
        engine_config: The engines' configuration (the dtype weights travel in).
        sync_config: Bucket size, verification, transfer timeout.
        step_timeout_s: Bound on each driver round.
        run_name: Prefix of the per-run rendezvous keys.
        on_spans: Where the spans that come back with the answers go (the timeline).
    """

    def __init__(
        self,
        fleet: Fleet,
        engine_config: EngineConfig,
        sync_config: SyncConfig,
        step_timeout_s: float,
        run_name: str,
        on_spans=None,
    ):
        self.fleet = fleet
        self.engine_config = engine_config
        self.sync_config = sync_config
        self.timeout_s = step_timeout_s
        self.run_name = run_name
        self._on_spans = on_spans or (lambda spans: None)
        self._sequence = 0  # syncs so far: keys each sync's manifest uniquely
        self.bucket_plan: BucketPlan | None = None
        self.groups: tuple[TransferGroup, ...] = plan_transfer_groups(fleet.plan, fleet.device)
        self.rendezvous: list[Rendezvous] = []
        #: Sequential driver rounds of the last :meth:`setup` (constant: 3).
        self.setup_rounds = 0

    @property
    def bucket_bytes(self) -> int:
        """The requested bucket size: the config's, else the default for the bundles' device."""
        return self.sync_config.bucket_bytes or default_bucket_bytes(self.fleet.device)

    def _round(self, calls: list[Call]) -> list:
        self.setup_rounds += 1
        spans: list = []
        try:
            return wait_all(calls, self.timeout_s, spans=spans)
        finally:
            self._on_spans(spans)

    def setup(self, tag: Tag) -> BucketPlan:
        """Checks compatibility, plans buckets and (re)builds every transfer group.

        Three driver rounds, each one set of concurrent calls (see the module docstring).
        """
        fleet, spec = self.fleet, self.fleet.plan.spec
        ranks = range(spec.trainer_world_size)
        self.setup_rounds = 0
        multi_node = spec.nodes > 1
        # Loopback unless a collective group spans nodes (an IPC group never does).
        remote = sorted(
            {g.sender_rank for g in self.groups if multi_node and g.backend is not Backend.CUDA_IPC}
        )
        dtype = self.engine_config.dtype.torch
        first = [fleet.trainer_call(r, TrainerTenant.close_sync_stores, tag=tag) for r in ranks]
        first += [
            fleet.trainer_call(0, TrainerTenant.weight_metas, dtype, tag=tag),
            fleet.engine_call(0, EngineTenant.expected_weights, tag=tag),
        ]
        first += [fleet.trainer_call(r, TrainerTenant.node_address, True, tag=tag) for r in remote]
        results = self._round(first)
        sent, expected = results[len(ranks) : len(ranks) + 2]
        hosts = dict(zip(remote, results[len(ranks) + 2 :], strict=True))
        check_compatible(sent, expected)
        self.bucket_plan = plan_buckets(sent, self.bucket_bytes, expected.packing)
        run_key = f"{self.run_name}-{uuid.uuid4().hex[:8]}"
        timeout = self.sync_config.timeout_s
        wanted = [
            (hosts.get(g.sender_rank, "127.0.0.1"), g, f"{run_key}-g{i}")
            for i, g in enumerate(self.groups)
        ]
        ports = self._round(
            [
                fleet.trainer_call(
                    g.sender_rank,
                    TrainerTenant.host_sync_store,
                    host,
                    g.world_size,
                    key,
                    timeout,
                    tag=tag,
                )
                for host, g, key in wanted
            ]
        )
        rdvs = [
            Rendezvous(host, port, g.world_size, key, timeout, g.backend)
            for (host, g, key), port in zip(wanted, ports, strict=True)
        ]
        calls = [
            fleet.trainer_call(
                r,
                TrainerTenant.setup_sync,
                self.bucket_plan,
                [rdv for g, rdv in zip(self.groups, rdvs, strict=True) if g.sender_rank == r],
                tag=tag,
            )
            for r in ranks
        ]
        for e in range(spec.engines):
            per_tp = []
            for tp in range(spec.engine_tp):
                receiver = Receiver(e, tp)
                g, rdv = next(
                    (g, rdv)
                    for g, rdv in zip(self.groups, rdvs, strict=True)
                    if receiver in g.receivers
                )
                per_tp.append((rdv, g.rank_of(receiver)))
            setup = ReceiverSetup(
                tuple(r for r, _ in per_tp),
                tuple(k for _, k in per_tp),
                self.bucket_plan,
                engine=f"engine{e}",
            )
            calls.append(fleet.engine_call(e, EngineTenant.setup_sync, setup, tag=tag))
        self._round(calls)
        self.rendezvous = rdvs
        return self.bucket_plan

    def add_transfer(self, chain: Chain, version: int, tag: Tag) -> TransferSteps:
        """Adds one sync to ``chain``: every rank sends while every engine receives.

        The sends and receives run concurrently (ZeRO-3 ranks all take part in the gathers).
        Verification needs no step of its own: the sender's manifest of fingerprints travels
        with the buckets, every engine worker compares what it received with it, and each
        engine takes ``version`` only once that passed. Nothing waits on the driver.
        """
        fleet, spec = self.fleet, self.fleet.plan.spec
        self._sequence += 1
        request = SyncRequest(
            version=version, verify=self.sync_config.verify, sequence=self._sequence
        )
        sends = [
            chain.add(fleet.trainer_call(r, TrainerTenant.send_weights, request, tag=tag))
            for r in range(spec.trainer_world_size)
        ]
        receives = [
            chain.add(fleet.engine_call(e, EngineTenant.receive_weights, request, tag=tag))
            for e in range(spec.engines)
        ]
        return TransferSteps(version, sends, receives)

    def report(self, steps: TransferSteps, results: list) -> SyncReport:
        """The :class:`SyncReport` of a transfer added by :meth:`add_transfer`, from its results.

        ``seconds`` is the longest receive as the engines' workers timed it (from their first
        wait to the end of their last apply).
        """
        sent = results[steps.sends[0]]  # rank 0 always sends
        receipts = [results[i] for i in steps.receives]
        return SyncReport(
            version=steps.version,
            seconds=max((w.seconds for r in receipts for w in r.workers), default=0.0),
            bytes=sent.bytes_sent,
            buckets=len(self.bucket_plan.buckets),
            verified_tensors=sum(r.verified for r in receipts),
            applied_checked=sum(r.applied for r in receipts),
            sender={
                "seconds": sent.seconds,
                "gather_s": sent.gather_s,
                "pack_s": sent.pack_s,
                "wait_s": sent.wait_s,
            },
            receivers=[
                [
                    {"seconds": w.seconds, "wait_s": w.wait_s, "apply_s": w.apply_s}
                    for w in r.workers
                ]
                for r in receipts
            ],
        )
