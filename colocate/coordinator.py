"""The coordinator: the one owner of ordering.

It creates the actors, moves every GPU through the phase protocol (``colocate.phases``),
streams weights trainer -> engines, and records the timeline.

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

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import ray

from colocate.calls import Call, handover, wait_all
from colocate.config import (
    ConfigError,
    EngineConfig,
    LoadFormat,
    Sampling,
    SyncConfig,
    TrainerConfig,
)
from colocate.config import check_engine_model as _check_engine_model
from colocate.engine import Completion, EngineActor
from colocate.phases import Phase, PhaseError, check_transition, require
from colocate.timeline import Timeline
from colocate.trainer import LossFn, TrainerActor
from placement import Plan, Reservation, TopologySpec, plan, reserve
from weight_sync.buckets import BucketPlan, default_bucket_bytes, plan_buckets
from weight_sync.fingerprint import compare
from weight_sync.groups import Receiver, plan_transfer_groups
from weight_sync.receiver import ReceiverSetup, SyncRequest
from weight_sync.transport import Backend, Rendezvous

__all__ = ["Coordinator", "SyncReport", "Timeouts"]


@dataclass(frozen=True)
class Timeouts:
    """Bounds on actor work, in seconds.

    Attributes:
        start_s: Creating actors (first use of DeepSpeed compiles its CPU ops: ~100 s).
        step_s: One transition, generate call or train step.
    """

    start_s: float = 600.0
    step_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("start_s", "step_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1e6:
                raise ConfigError(f"Timeouts.{name}={value!r}: must be in (0, 1e6) seconds")


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
        name: Prefix of actor and placement-group names (unique per run by default).
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
        if sleep_level not in (1, 2):
            raise ConfigError(f"sleep_level={sleep_level!r}: must be 1 or 2; fix: pass 1 or 2")
        if engine.tensor_parallel_size != spec.engine_tp:
            raise ConfigError(
                f"EngineConfig.tensor_parallel_size={engine.tensor_parallel_size} but "
                f"TopologySpec.engine_tp={spec.engine_tp}; fix: make them equal"
            )
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn={loss_fn!r}: must be callable (loss_fn(model, batch))")
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
        self.device_type = "cuda" if _cuda_cluster() else "cpu"
        _check_engine_model(engine, self.device_type)
        self.phase = Phase.INIT
        self.step = 0
        self.weight_version = 0 if engine.load_format is LoadFormat.AUTO else -1
        self.timeline = Timeline()
        self.last_sync: SyncReport | None = None
        self.bucket_plan: BucketPlan | None = None
        self.reservation: Reservation | None = None
        self.engines: list = []
        self.trainers: list = []
        self._started = False

    # ----- names and lanes --------------------------------------------------------------------

    @property
    def colocated(self) -> bool:
        """True when trainer ranks and engines share GPUs (memory hand-over needed)."""
        return bool(self.plan.shared_bundles)

    def _engine_lanes(self, e: int) -> tuple[int, ...]:
        return self.plan.engine_bundles(e)

    def _shared(self, lanes: Sequence[int]) -> bool:
        shared = set(self.plan.shared_bundles)
        return any(lane in shared for lane in lanes)

    def _engine_call(self, e: int, method: str, *args) -> Call:
        return Call(f"engine{e}", self.engines[e], method, args, self._engine_lanes(e))

    def _trainer_call(self, r: int, method: str, *args) -> Call:
        return Call(f"trainer{r}", self.trainers[r], method, args, (self.plan.trainer_bundle(r),))

    def _tag(self, phase: Phase | str) -> tuple[str, int]:
        return (phase.value if isinstance(phase, Phase) else phase, self.step)

    # ----- start-up ---------------------------------------------------------------------------

    def start(self) -> Coordinator:
        """Reserves GPUs, creates the actors in memory order, and runs the first sync.

        Order on each GPU: the engine is created (vLLM sizes itself from the free memory) and,
        colocated, put to sleep; only then is the trainer rank created there. The first sync
        then gives every engine the trainer's weights (an engine started with dummy weights
        never serves before it), and the pipeline enters ROLLOUT.
        """
        if self._started:
            return self
        self._started = True
        try:
            self.reservation = reserve(
                self.plan, timeout_s=min(120.0, self.timeouts.start_s), name=self.name
            )
            self._create_engines()
            self._create_trainers()
            self._init_sync()
            self._do_sync()
        except BaseException:
            self.phase = Phase.FAILED
            self._collect_spans()
            raise
        return self

    def _engine_env(self) -> dict[str, str]:
        # In-process engine core: collective_rpc then reaches the worker in this process.
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_LOGGING_LEVEL": self.engine_config.log_level,
        }
        if self.device_type == "cpu" and self.spec.engine_tp > 1:
            # The CPU backend's NUMA auto-binding refuses several workers on one NUMA node.
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        return env

    def _create_engines(self) -> None:
        cls = ray.remote(EngineActor)
        for e in range(self.spec.engines):
            launch = self.reservation.engine_launch(e, cuda=self.device_type == "cuda")
            env = {**self._engine_env(), **launch.executor_env}
            self.engines.append(
                cls.options(**launch.actor_options, name=f"{self.name}-engine{e}").remote(
                    self.engine_config, f"engine{e}", self._engine_lanes(e), env
                )
            )
        tag = self._tag("start")
        wait_all(
            [self._engine_call(e, "start", tag) for e in range(self.spec.engines)],
            tag,
            self.timeouts.start_s,
        )

    def _create_trainers(self) -> None:
        cls = ray.remote(self.trainer_cls)
        env = {"DS_ACCELERATOR": "cpu"} if self.device_type == "cpu" else {}
        for r in range(self.spec.trainer_world_size):
            self.trainers.append(
                cls.options(
                    **self.reservation.trainer_options(r), name=f"{self.name}-trainer{r}"
                ).remote(
                    self.trainer_config,
                    r,
                    self.spec.trainer_world_size,
                    f"trainer{r}",
                    self.plan.trainer_bundle(r),
                    self.loss_fn,
                    env,
                )
            )
        tag = self._tag(Phase.INIT)
        master = wait_all(
            [self._trainer_call(0, "free_address", self.spec.nodes > 1)], tag, self.timeouts.step_s
        )[0]
        level = 2 if self.engine_config.load_format is LoadFormat.DUMMY else self.sleep_level
        releases = [
            self._engine_call(e, "sleep", level, tag)
            for e in range(self.spec.engines)
            if self._shared(self._engine_lanes(e))
        ]
        starts = [
            self._trainer_call(r, "start", master, self.sync_config.timeout_s * 5, tag)
            for r in range(self.spec.trainer_world_size)
        ]
        handover(releases, starts, tag, self.timeouts.start_s)
        self._collect_spans()

    def _init_sync(self) -> None:
        """Plans buckets from the trainer's weights and builds every transfer group.

        Groups come from the placement (``weight_sync.groups``): one collective group fed by
        trainer rank 0, plus on CUDA one IPC group per trainer rank that shares its GPU with
        engine workers. Each sender hosts its group's store; then senders and receivers build
        the group concurrently.
        """
        tag = self._tag(Phase.INIT)
        t = self.spec.trainer_world_size
        wait_all(
            [self._trainer_call(r, "close_sync_stores") for r in range(t)],
            tag,
            self.timeouts.step_s,
        )
        dtype = self.engine_config.dtype.torch
        metas = wait_all([self._trainer_call(0, "weight_metas", dtype)], tag, self.timeouts.step_s)[
            0
        ]
        size = self.sync_config.bucket_bytes or default_bucket_bytes(self.device_type)
        self.bucket_plan = plan_buckets(metas, size)
        groups = plan_transfer_groups(self.plan, self.device_type)
        run_key = f"{self.name}-{uuid.uuid4().hex[:8]}"
        rdvs = []
        for i, g in enumerate(groups):
            # A store on loopback unless a collective group spans nodes (IPC never does).
            multi = self.spec.nodes > 1 and g.backend is not Backend.CUDA_IPC
            host = "127.0.0.1"
            if multi:
                host = wait_all(
                    [self._trainer_call(g.sender_rank, "free_address", True)],
                    tag,
                    self.timeouts.step_s,
                )[0][0]
            key = f"{run_key}-g{i}"
            port = wait_all(
                [
                    self._trainer_call(
                        g.sender_rank,
                        "host_sync_store",
                        host,
                        g.world_size,
                        key,
                        self.sync_config.timeout_s,
                    )
                ],
                tag,
                self.timeouts.step_s,
            )[0]
            rdvs.append(
                Rendezvous(host, port, g.world_size, key, self.sync_config.timeout_s, g.backend)
            )
        calls = [
            self._trainer_call(
                r,
                "setup_sync",
                self.bucket_plan,
                [rdv for g, rdv in zip(groups, rdvs, strict=True) if g.sender_rank == r],
            )
            for r in range(t)
        ]
        for e in range(self.spec.engines):
            per_tp = []
            for tp in range(self.spec.engine_tp):
                receiver = Receiver(e, tp)
                g, rdv = next(
                    (g, rdv) for g, rdv in zip(groups, rdvs, strict=True) if receiver in g.receivers
                )
                per_tp.append((rdv, g.rank_of(receiver)))
            setup = ReceiverSetup(
                tuple(r for r, _ in per_tp), tuple(k for _, k in per_tp), self.bucket_plan
            )
            calls.append(self._engine_call(e, "setup_sync", setup))
        wait_all(calls, tag, self.timeouts.step_s)

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
            self._engine_call(e, "generate", prompts[bounds[e] : bounds[e + 1]], sampling, tag)
            for e in used
        ]
        results = wait_all(calls, tag, self.timeouts.step_s)
        out = []
        for e, completions in zip(used, results, strict=True):
            out.extend(replace(c, prompt_index=c.prompt_index + bounds[e]) for c in completions)
        return out

    def train(self, batch: dict) -> dict[str, float]:
        """Enters TRAIN if needed, then runs one train step on every rank; returns rank means."""
        self._transition(Phase.TRAIN)
        self.step += 1
        calls = [
            self._trainer_call(r, "train_step", batch, self._tag(Phase.TRAIN))
            for r in range(self.spec.trainer_world_size)
        ]
        metrics = self._guard(lambda: wait_all(calls, self._tag(Phase.TRAIN), self.timeouts.step_s))
        keys = metrics[0].keys()
        return {k: sum(m[k] for m in metrics) / len(metrics) for k in keys}

    def sync(self) -> SyncReport:
        """TRAIN (or ROLLOUT) -> SYNC -> ROLLOUT: sends the trainer's weights to every engine."""
        require(self.phase, (Phase.ROLLOUT, Phase.TRAIN), "sync")
        if self.phase is Phase.ROLLOUT:
            self._transition(Phase.TRAIN)
        self._guard(self._do_sync)
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

    def recover(self) -> SyncReport:
        """From FAILED: re-sends the trainer's current weights to every engine, then ROLLOUT."""
        require(self.phase, Phase.FAILED, "recover")

        def body() -> None:
            self._recover_memory()
            self._init_sync()  # a failed transfer may have left a group half-used: rebuild it
            self._do_sync()

        self._guard(body)
        return self.last_sync

    # ----- transitions ------------------------------------------------------------------------

    def _guard(self, fn):
        try:
            return fn()
        except BaseException:
            self.phase = Phase.FAILED
            raise
        finally:
            self._collect_spans()

    def _transition(self, target: Phase) -> None:
        require(self.phase, (Phase.ROLLOUT, Phase.TRAIN), f"entering {target.value}")
        if not check_transition(self.phase, target):
            return
        self._guard(lambda: self._run_transition(target))

    def _run_transition(self, target: Phase) -> None:
        tag = self._tag(target)
        t = self.spec.trainer_world_size
        engines = range(self.spec.engines)
        if target is Phase.TRAIN:
            releases = [
                self._engine_call(e, "sleep", self.sleep_level, tag)
                for e in engines
                if self._shared(self._engine_lanes(e))
            ]
            acquires = [self._trainer_call(r, "reload", tag) for r in range(t)]
        elif target is Phase.ROLLOUT:  # skip_sync: engines wake with the weights they kept
            releases = [
                self._trainer_call(r, "offload", False, tag)
                for r in range(t)
                if self._shared((self.plan.trainer_bundle(r),))
            ]
            acquires = [self._engine_call(e, "wake_kv", tag) for e in engines]
        else:
            raise PhaseError(f"no direct transition to {target.value!r}")
        handover(releases, acquires, tag, self.timeouts.step_s)
        self.phase = target

    def _do_sync(self) -> None:
        """The body of a sync, from INIT/TRAIN/FAILED; ends in ROLLOUT with the version bumped."""
        t = self.spec.trainer_world_size
        engines = range(self.spec.engines)
        trainer_shared = [self._shared((self.plan.trainer_bundle(r),)) for r in range(t)]
        tag = self._tag(Phase.SYNC)
        handover(
            [self._trainer_call(r, "offload", True, tag) for r in range(t) if trainer_shared[r]],
            [self._engine_call(e, "wake_weights", tag) for e in engines],
            tag,
            self.timeouts.step_s,
        )
        self.phase = Phase.SYNC
        version = self.weight_version + 1 if self.weight_version >= 0 else 1
        report = self._transfer(version, tag)
        tag = self._tag(Phase.ROLLOUT)
        handover(
            [self._trainer_call(r, "offload", False, tag) for r in range(t) if trainer_shared[r]],
            [self._engine_call(e, "wake_kv", tag) for e in engines],
            tag,
            self.timeouts.step_s,
        )
        wait_all(
            [self._engine_call(e, "commit_version", version) for e in engines],
            tag,
            self.timeouts.step_s,
        )
        self.weight_version = version
        self.last_sync = report
        self.phase = Phase.ROLLOUT

    def _recover_memory(self) -> None:
        # Bring every tenant to the SYNC precondition: engines asleep, trainers FULL.
        tag = self._tag("recover")
        handover(
            [
                self._engine_call(e, "sleep", self.sleep_level, tag)
                for e in range(self.spec.engines)
                if self._shared(self._engine_lanes(e))
            ],
            [self._trainer_call(r, "reload", tag) for r in range(self.spec.trainer_world_size)],
            tag,
            self.timeouts.step_s,
        )

    def _transfer(self, version: int, tag: tuple[str, int]) -> SyncReport:
        import time

        verify = self.sync_config.verify
        request = SyncRequest(version=version, verify=verify)
        calls = [
            self._trainer_call(r, "send_weights", request, tag)
            for r in range(self.spec.trainer_world_size)
        ]
        calls += [
            self._engine_call(e, "receive_weights", request, tag) for e in range(self.spec.engines)
        ]
        start = time.perf_counter()
        results = wait_all(calls, tag, self.timeouts.step_s)
        seconds = time.perf_counter() - start
        senders = results[: self.spec.trainer_world_size]
        # Every sending rank fingerprints the same full tensors; rank 0 always sends.
        sent = next((s for s in senders if s.bytes_sent), senders[0])
        received = results[self.spec.trainer_world_size :]
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
            applied = self._check_applied(sent.fingerprints, tag)
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

    def _check_applied(self, sent: dict, tag: tuple[str, int]) -> int:
        """Compares fingerprints of the applied parameters that the platform lets us read."""
        from weight_sync.verify import check_applied

        per_engine = wait_all(
            [self._engine_call(e, "applied_fingerprints") for e in range(self.spec.engines)],
            tag,
            self.timeouts.step_s,
        )
        checked = 0
        for e, workers in enumerate(per_engine):
            checked += check_applied(
                sent, workers, self.bucket_plan.fused_groups, where=f"engine{e} (version {tag[1]})"
            )
        return checked

    # ----- timeline, faults, shutdown ---------------------------------------------------------

    def _collect_spans(self) -> None:
        handles = [(f"engine{e}", h) for e, h in enumerate(self.engines)]
        handles += [(f"trainer{r}", h) for r, h in enumerate(self.trainers)]
        for _, h in handles:
            try:
                self.timeline.extend(ray.get(h.drain_spans.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - a dead actor has no spans to give; keep going
                continue

    def inject_fault(self, engine: int, fault: str) -> None:
        """Test hook: forwards ``fault`` to engine ``engine``'s workers."""
        wait_all(
            [self._engine_call(engine, "inject_fault", fault)],
            self._tag(self.phase),
            self.timeouts.step_s,
        )

    def trainer_fingerprints(self) -> dict:
        """Fingerprints of the trainer's full parameters (to prove its state is intact)."""
        calls = [
            self._trainer_call(r, "param_fingerprints") for r in range(self.spec.trainer_world_size)
        ]
        return wait_all(calls, self._tag(self.phase), self.timeouts.step_s)[0]

    def save_trainer(self, path: str) -> str:
        """Checkpoints every trainer rank under ``path``."""
        calls = [self._trainer_call(r, "save", path) for r in range(self.spec.trainer_world_size)]
        wait_all(calls, self._tag(self.phase), self.timeouts.step_s)
        return path

    def export_hf(self, path: str) -> str:
        """Writes the trainer's current weights as an HF directory in the engine dtype."""
        dtype = self.engine_config.dtype.value
        calls = [
            self._trainer_call(r, "export_hf", path, dtype)
            for r in range(self.spec.trainer_world_size)
        ]
        wait_all(calls, self._tag(self.phase), self.timeouts.step_s)
        return path

    def shutdown(self) -> None:
        """Stops every actor and releases the GPUs. Idempotent; never raises for dead actors."""
        if self.phase is Phase.SHUTDOWN:
            return
        self._collect_spans()
        for h in self.engines + self.trainers:
            try:
                ray.get(h.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort before the kill
                pass
            ray.kill(h, no_restart=True)
        self.engines, self.trainers = [], []
        if self.reservation is not None:
            self.reservation.release()
        self.phase = Phase.SHUTDOWN

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _cuda_cluster() -> bool:
    """True when the connected Ray cluster has real GPUs (logical GPUs on a CPU box do not)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
