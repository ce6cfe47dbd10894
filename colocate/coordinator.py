"""The coordinator: the one owner of ordering.

It reserves the GPUs, has the fleet create the actors, moves every GPU through the phase
protocol (``colocate.phases``), has the sync driver stream weights trainer -> engines, records
the timeline, and recovers from faults.

One RL step on a colocated topology (``../shared/DESIGN.md`` section 3):

1. ROLLOUT: engines generate; trainers are offloaded.
2. ROLLOUT -> TRAIN: per GPU, engines sleep; then trainers reload. Trainers train.
3. TRAIN -> SYNC: per GPU, trainers offload grads and optimizer states; then engines wake their
   weights (no KV cache). Weights stream trainer -> engines; fingerprints are compared.
4. SYNC -> ROLLOUT: per GPU, trainers offload params; then engines wake the KV cache (which
   resets the prefix cache). Only now is the weight version bumped.

With separate pools (no GPU shared) the memory steps are skipped: engines stay awake and
trainers keep their state; the sync and the phase rules are the same.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from colocate.calls import handover, wait_all
from colocate.config import (
    ConfigError,
    EngineConfig,
    LoadFormat,
    Sampling,
    SyncConfig,
    TrainerConfig,
)
from colocate.config import check_engine_model as _check_engine_model
from colocate.engine import Completion
from colocate.errors import ColocateError, InputError
from colocate.fleet import Fleet
from colocate.phases import Phase, PhaseError, check_transition, require
from colocate.syncing import SyncDriver, SyncReport
from colocate.timeline import Timeline
from colocate.trainer import LossFn, TrainerActor, shard_batch
from placement import Plan, Reservation, TopologySpec, plan, reserve

__all__ = ["Coordinator", "SyncReport", "Timeouts"]


@dataclass(frozen=True)
class Timeouts:
    """Bounds on actor work, in seconds.

    Attributes:
        start_s: Creating actors (first use of DeepSpeed compiles its CPU ops: ~100 s).
        step_s: One transition, generate call, train step or sync.
        ping_s: Health check of every actor during recovery.
    """

    start_s: float = 600.0
    step_s: float = 300.0
    ping_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("start_s", "step_s", "ping_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and 0 < value < 1e6)
            ):
                raise ConfigError(
                    f"Timeouts.{name}={value!r}: must be a number in (0, 1e6) seconds; "
                    "fix: pass e.g. 300"
                )


class Coordinator:
    """Runs trainer ranks and vLLM engines on one topology, in phase order.

    Args:
        spec: Which GPUs the trainer ranks and engines use.
        engine: Engine configuration (shared by all engines).
        trainer: Trainer configuration (shared by all ranks).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``, a module-level function.
        sync: Weight-transfer settings.
        sleep_level: 1 keeps a host copy of engine weights while asleep; 2 drops them (the
            weights are always re-sent before the KV cache wakes).
        timeouts: Bounds on actor work.
        trainer_cls: A :class:`TrainerActor` subclass to use instead (custom training logic).
        name: Prefix of actor, placement-group and rendezvous names (unique by default).

    Raises:
        ConfigError: An inconsistent configuration (before anything starts).
        TopologyError: An invalid topology (before anything starts).
    """

    def __init__(
        self,
        spec: TopologySpec,
        engine: EngineConfig,
        trainer: TrainerConfig,
        loss_fn: LossFn,
        *,
        sync: SyncConfig | None = None,
        sleep_level: int = 1,
        timeouts: Timeouts | None = None,
        trainer_cls: type[TrainerActor] = TrainerActor,
        name: str | None = None,
    ):
        if sleep_level not in (1, 2) or isinstance(sleep_level, bool):
            raise ConfigError(f"sleep_level={sleep_level!r}: must be 1 or 2; fix: pass 1 or 2")
        if engine.tensor_parallel_size != spec.engine_tp:
            raise ConfigError(
                f"EngineConfig.tensor_parallel_size={engine.tensor_parallel_size} but "
                f"TopologySpec.engine_tp={spec.engine_tp}; fix: make them equal"
            )
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn={loss_fn!r}: must be callable as loss_fn(model, batch)")
        if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, TrainerActor)):
            raise ConfigError(f"trainer_cls={trainer_cls!r}: must subclass TrainerActor")
        if not trainer.deepspeed and spec.trainer_world_size != 1:
            raise ConfigError(
                f"TrainerConfig.deepspeed=False needs trainer_world_size=1, got "
                f"{spec.trainer_world_size}; fix: use DeepSpeed or one trainer rank"
            )
        self.spec = spec
        self.plan: Plan = plan(spec)
        self.engine_config = engine
        self.trainer_config = trainer
        self.loss_fn = loss_fn
        self.sync_config = sync or SyncConfig()
        self.sleep_level = sleep_level
        self.timeouts = timeouts or Timeouts()
        self.trainer_cls = trainer_cls
        self.name = name or f"colocate-{uuid.uuid4().hex[:8]}"
        self.device_type = "cuda" if _cuda_available() else "cpu"
        _check_engine_model(engine, self.device_type)
        self.phase = Phase.INIT
        self.step = 0
        self.weight_version = 0 if engine.load_format is LoadFormat.AUTO else -1
        self.timeline = Timeline()
        self.last_sync: SyncReport | None = None
        self.reservation: Reservation | None = None
        self.fleet: Fleet | None = None
        self._sync: SyncDriver | None = None
        self._started = False

    # ----- helpers ----------------------------------------------------------------------------

    @property
    def colocated(self) -> bool:
        """True when trainer ranks and engines share GPUs (memory hand-over needed)."""
        return bool(self.plan.shared_bundles)

    @property
    def bucket_plan(self):
        """The bucket layout of every sync (None before start)."""
        return self._sync.bucket_plan if self._sync else None

    def _shared(self, lanes: Sequence[int]) -> bool:
        return bool(set(lanes) & set(self.plan.shared_bundles))

    def _shared_engines(self) -> list[int]:
        return [e for e in range(self.spec.engines) if self._shared(self.plan.engine_bundles(e))]

    def _shared_trainers(self) -> list[int]:
        ranks = range(self.spec.trainer_world_size)
        return [r for r in ranks if self._shared((self.plan.trainer_bundle(r),))]

    def _tag(self, phase: Phase | str) -> tuple[str, int]:
        return (phase.value if isinstance(phase, Phase) else phase, self.step)

    def _wait(self, calls, tag, timeout_s=None) -> list:
        return wait_all(calls, tag, timeout_s or self.timeouts.step_s)

    # ----- start-up ---------------------------------------------------------------------------

    def start(self) -> Coordinator:
        """Reserves GPUs, creates the actors in memory order, and runs the first sync.

        Order on each GPU: the engine is created (vLLM sizes itself from the free memory) and,
        colocated, put to sleep; only then is the trainer rank created there. The first sync
        then gives every engine the trainer's weights (an engine started with dummy weights
        never serves before it), and the pipeline enters ROLLOUT.

        Raises:
            PhaseError: Called twice, or after shutdown.
        """
        if self._started:
            raise PhaseError(
                f"start() called twice (phase {self.phase.value!r}); a coordinator starts once: "
                "create a new one for a new run"
            )
        self._started = True
        self._guard(self._start_body)
        self._collect_spans()
        return self

    def _start_body(self) -> None:
        self.reservation = reserve(
            self.plan, timeout_s=min(120.0, self.timeouts.start_s), name=self.name
        )
        self.fleet = Fleet(
            self.name,
            self.plan,
            self.reservation,
            self.engine_config,
            self.trainer_config,
            self.trainer_cls,
            self.loss_fn,
            self.device_type,
        )
        self._sync = SyncDriver(
            self.fleet,
            self.engine_config,
            self.sync_config,
            self.device_type,
            self.timeouts.step_s,
            self.name,
        )
        engines = range(self.spec.engines)
        for e in engines:
            self.fleet.spawn_engine(e)
        tag = self._tag("start")
        self._wait(
            [self.fleet.engine_call(e, "start", tag) for e in engines],
            tag,
            self.timeouts.start_s,
        )
        self._start_trainers(self._tag(Phase.INIT))
        self._sync.setup(self._tag(Phase.INIT))
        self._do_sync()

    def _start_trainers(self, tag: tuple[str, int]) -> None:
        """Creates every trainer rank; on each shared GPU only after its engine slept."""
        fleet = self.fleet
        for r in range(self.spec.trainer_world_size):
            fleet.spawn_trainer(r)
        master = self._wait(
            [
                fleet.trainer_call(
                    0, "host_group_store", self.spec.nodes > 1, self.sync_config.timeout_s * 5
                )
            ],
            tag,
        )[0]
        level = 2 if self.engine_config.load_format is LoadFormat.DUMMY else self.sleep_level
        collective_timeout = self.sync_config.timeout_s * 5
        handover(
            [fleet.engine_call(e, "sleep", level, tag) for e in self._shared_engines()],
            [
                fleet.trainer_call(r, "start", master, collective_timeout, tag)
                for r in range(self.spec.trainer_world_size)
            ],
            tag,
            self.timeouts.start_s,
        )
        self._collect_spans()

    # ----- the RL loop ------------------------------------------------------------------------

    def generate(self, prompts: Sequence, sampling: Sampling) -> list[Completion]:
        """Generates on every engine (prompts split in contiguous chunks); needs ROLLOUT.

        Returns:
            Completions in prompt order (``prompt_index`` is global), ``sampling.n`` each.
        """
        require(self.phase, Phase.ROLLOUT, "generate")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        n = self.spec.engines
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        used = [e for e in range(n) if bounds[e + 1] > bounds[e]]
        tag = self._tag(Phase.ROLLOUT)
        calls = [
            self.fleet.engine_call(e, "generate", prompts[bounds[e] : bounds[e + 1]], sampling, tag)
            for e in used
        ]
        out = []
        results = self._guard(lambda: self._wait(calls, tag))
        for e, completions in zip(used, results, strict=True):
            out.extend(replace(c, prompt_index=c.prompt_index + bounds[e]) for c in completions)
        return out

    def train(self, batch: dict) -> dict[str, float]:
        """Enters TRAIN if needed, then runs one train step on every rank; returns rank means.

        The batch (a dict of tensors or lists, one row per sequence) is cut into contiguous
        shards on the driver; each rank receives only its own.
        """
        world = self.spec.trainer_world_size
        shards = [shard_batch(batch, r, world) for r in range(world)]  # bad input raises here
        self._transition(Phase.TRAIN)
        self.step += 1
        tag = self._tag(Phase.TRAIN)
        calls = [self.fleet.trainer_call(r, "train_step", shards[r], tag) for r in range(world)]
        metrics = self._guard(lambda: self._wait(calls, tag))
        return {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}

    def sync(self) -> SyncReport:
        """TRAIN (or ROLLOUT) -> SYNC -> ROLLOUT: sends the trainer's weights to every engine."""
        require(self.phase, (Phase.ROLLOUT, Phase.TRAIN), "sync")
        if self.phase is Phase.ROLLOUT:
            self._transition(Phase.TRAIN)
        self._guard(self._do_sync)
        self._collect_spans()
        return self.last_sync

    def skip_sync(self) -> None:
        """TRAIN -> ROLLOUT without sending weights: engines keep the weights they had.

        Only with sleep level 1 (a host copy of the weights survives the sleep).
        """
        if self.sleep_level != 1 and self.colocated:
            raise PhaseError(
                "skip_sync needs sleep_level=1: at level 2 the engines dropped their weights; "
                "call sync() instead"
            )
        self._transition(Phase.ROLLOUT)
        self._collect_spans()

    # ----- transitions ------------------------------------------------------------------------

    def _guard(self, fn):
        """Runs ``fn``; any failure but refused input or a wrong-phase call leaves FAILED.

        Spans are collected after a failure here, and otherwise once per step (after the
        sync) and at shutdown: collecting them costs a round trip to every actor.
        """
        try:
            return fn()
        except (InputError, PhaseError):
            raise  # nothing was changed: the pipeline stays where it was
        except BaseException:
            self.phase = Phase.FAILED
            # Peers of a dead actor may sit in a collective until its timeout: do not wait for
            # their spans here (they come with a later collection).
            self._collect_spans(timeout_s=1.0)
            raise

    def _transition(self, target: Phase) -> None:
        require(self.phase, (Phase.ROLLOUT, Phase.TRAIN), f"entering {target.value}")
        if check_transition(self.phase, target):
            self._guard(lambda: self._run_transition(target))

    def _run_transition(self, target: Phase) -> None:
        tag, fleet = self._tag(target), self.fleet
        if target is Phase.TRAIN:
            releases = [
                fleet.engine_call(e, "sleep", self.sleep_level, tag) for e in self._shared_engines()
            ]
            acquires = [
                fleet.trainer_call(r, "reload", tag) for r in range(self.spec.trainer_world_size)
            ]
        elif target is Phase.ROLLOUT:  # skip_sync: engines wake with the weights they kept
            releases = [
                fleet.trainer_call(r, "offload", False, tag) for r in self._shared_trainers()
            ]
            acquires = [
                fleet.engine_call(e, "wake_kv", tag, None) for e in range(self.spec.engines)
            ]
        else:
            raise PhaseError(f"no direct transition to {target.value!r}")
        handover(releases, acquires, tag, self.timeouts.step_s)
        self.phase = target

    def _do_sync(self) -> None:
        """The body of a sync, from INIT/TRAIN: ends in ROLLOUT with the version bumped."""
        fleet, engines = self.fleet, range(self.spec.engines)
        tag = self._tag(Phase.SYNC)
        handover(
            [fleet.trainer_call(r, "offload", True, tag) for r in self._shared_trainers()],
            [fleet.engine_call(e, "wake_weights", tag) for e in engines],
            tag,
            self.timeouts.step_s,
        )
        self.phase = Phase.SYNC
        version = self.weight_version + 1 if self.weight_version >= 0 else 1
        report = self._sync.transfer(version, tag)
        tag = self._tag(Phase.ROLLOUT)
        # The transfer is verified by now: the engines tag generations with the new version
        # from the moment they can serve again.
        handover(
            [fleet.trainer_call(r, "offload", False, tag) for r in self._shared_trainers()],
            [fleet.engine_call(e, "wake_kv", tag, version) for e in engines],
            tag,
            self.timeouts.step_s,
        )
        self.weight_version = version
        self.last_sync = report
        self.phase = Phase.ROLLOUT

    # ----- recovery ---------------------------------------------------------------------------

    def recover(self, checkpoint: str | None = None) -> SyncReport:
        """From FAILED: replaces dead actors, re-sends the trainer's weights, enters ROLLOUT.

        Order: (1) ping every actor; (2) if a trainer rank died, its ZeRO shard is gone:
        every rank is replaced and restored from ``checkpoint`` (required then); (3) each dead
        engine is replaced on its bundle: on a shared GPU the trainer offloads first, the new
        engine starts, then sleeps; (4) trainers reload; (5) the transfer groups are rebuilt
        and a verified sync brings every engine to the trainer's weights.

        Args:
            checkpoint: A directory written by :meth:`save_trainer`; needed only when a
                trainer rank died.

        Raises:
            ColocateError: A trainer rank died and no checkpoint was given (stays FAILED).
        """
        require(self.phase, Phase.FAILED, "recover")
        # A survivor may still be blocked in the failed transfer until the transfer timeout:
        # wait that long for its answer before calling it dead.
        ping = max(self.timeouts.ping_s, self.sync_config.timeout_s + 5.0)
        dead_engines, dead_trainers = self.fleet.dead(ping)
        if dead_trainers and checkpoint is None:
            raise ColocateError(
                f"trainer rank(s) {dead_trainers} died and took their ZeRO shards with them; fix: "
                "call recover(checkpoint=...) with a directory written by save_trainer()",
                actor=f"trainer{dead_trainers[0]}",
                phase=self.phase.value,
                step=self.step,
            )

        def body() -> None:
            # Separate hand-overs, separate tags: the timeline checks each one's order.
            if dead_trainers:
                self._replace_trainers(checkpoint, self._tag("restart-trainers"))
            for e in dead_engines:
                self._replace_engine(e, self._tag("restart-engines"))
            tag = self._tag("recover")
            fleet = self.fleet
            handover(
                [
                    fleet.engine_call(e, "sleep", self.sleep_level, tag)
                    for e in self._shared_engines()
                ],
                [fleet.trainer_call(r, "reload", tag) for r in range(self.spec.trainer_world_size)],
                tag,
                self.timeouts.step_s,
            )
            # A failed transfer may have left a group half-used: always rebuild the groups.
            self._sync.setup(tag)
            self._do_sync()

        self._guard(body)
        self._collect_spans()
        return self.last_sync

    def _replace_trainers(self, checkpoint: str, tag: tuple[str, int]) -> None:
        for r in range(self.spec.trainer_world_size):
            self.fleet.kill_trainer(r)  # survivors are in a broken DeepSpeed group too
        self._start_trainers(tag)
        self._wait(
            [
                self.fleet.trainer_call(r, "load", checkpoint)
                for r in range(self.spec.trainer_world_size)
            ],
            tag,
        )

    def _replace_engine(self, e: int, tag: tuple[str, int]) -> None:
        fleet = self.fleet
        fleet.kill_engine(e)
        fleet.spawn_engine(e)
        lanes = set(self.plan.engine_bundles(e))
        ranks = [r for r in self._shared_trainers() if self.plan.trainer_bundle(r) in lanes]
        handover(
            [fleet.trainer_call(r, "offload", False, tag) for r in ranks],
            [fleet.engine_call(e, "start", tag)],
            tag,
            self.timeouts.start_s,
        )

    # ----- observation, checkpoints, shutdown -------------------------------------------------

    def _collect_spans(self, timeout_s: float = 30.0) -> None:
        if self.fleet is not None:
            self.timeline.extend(self.fleet.drain_spans(timeout_s))

    def actor_status(self) -> dict[str, dict]:
        """Each live actor's status: memory state, pid, RSS, open fds, threads."""
        return self.fleet.statuses() if self.fleet else {}

    def inject_fault(self, actor: str, fault: str) -> None:
        """Test hook: arms ``fault`` in ``actor`` (``"engine<i>"`` or ``"trainer<r>"``).

        Faults: ``corrupt_next_bucket`` (engine: flips bytes of the next bucket received),
        ``crash_in_generate`` / ``crash_in_receive`` (engine process exits there),
        ``crash_in_train_step`` / ``crash_in_send`` (trainer process exits there).
        """
        kind, index = actor.rstrip("0123456789"), int(actor[len(actor.rstrip("0123456789")) :])
        call = (self.fleet.engine_call if kind == "engine" else self.fleet.trainer_call)(
            index, "inject_fault", fault
        )
        self._wait([call], self._tag(self.phase))

    def trainer_fingerprints(self) -> dict:
        """Fingerprints of the trainer's full parameters (to prove its state is intact)."""
        calls = [
            self.fleet.trainer_call(r, "param_fingerprints")
            for r in range(self.spec.trainer_world_size)
        ]
        return self._wait(calls, self._tag(self.phase))[0]

    def save_trainer(self, path: str) -> str:
        """Checkpoints every trainer rank under ``path`` (model, optimizer, step)."""
        calls = [
            self.fleet.trainer_call(r, "save", path) for r in range(self.spec.trainer_world_size)
        ]
        self._wait(calls, self._tag(self.phase))
        return path

    def export_hf(self, path: str) -> str:
        """Writes the trainer's current weights as an HF directory in the engine dtype."""
        dtype = self.engine_config.dtype.value
        calls = [
            self.fleet.trainer_call(r, "export_hf", path, dtype)
            for r in range(self.spec.trainer_world_size)
        ]
        self._wait(calls, self._tag(self.phase))
        return path

    def shutdown(self) -> None:
        """Stops every actor and releases the GPUs. Idempotent; never raises for dead actors."""
        if self.phase is Phase.SHUTDOWN:
            return
        if self.fleet is not None:
            self._collect_spans()
            self.fleet.shutdown()
        if self.reservation is not None:
            self.reservation.release()
        self.phase = Phase.SHUTDOWN
        self._started = True

    def __enter__(self) -> Coordinator:
        try:
            return self.start()
        except BaseException:
            self.shutdown()  # __exit__ does not run when __enter__ raises: release everything
            raise

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _cuda_available() -> bool:
    """True when this driver sees CUDA (logical GPUs on a CPU machine do not count)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
