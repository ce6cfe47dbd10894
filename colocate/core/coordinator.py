"""The coordinator: the one owner of ordering.

It reserves the GPUs (and learns from the bundles what device they are), has the fleet create
the actors, moves every GPU through the phase protocol by executing rows of the hand-over
table (``colocate.core.handovers``, the protocol's only statement), has the sync driver stream
weights trainer -> engines, records the timeline (its own spans included), and recovers from
faults.

One RL step on a colocated topology (``docs/design.md``):

1. ROLLOUT: engines generate; trainers are offloaded.
   (With roles: ``score`` row, ROLLOUT -> SCORE: per GPU, engines sleep; then the roles
   resident in SCORE reload and score the rollout, ``call_role``.)
2. ``train`` row, ROLLOUT -> TRAIN: per GPU, engines sleep; then trainers reload. Trainers train.
3. ``sync`` row, TRAIN -> SYNC: per GPU, trainers offload grads and optimizer states; then
   engines wake their weights (no KV cache). Weights stream trainer -> engines; fingerprints
   are compared.
4. ``rollout`` row, SYNC -> ROLLOUT: per GPU, trainers offload params; then engines wake the
   KV cache (which resets the prefix cache). Each engine took the new weight version when it
   had verified what it received.

With separate pools (no GPU shared) the memory moves are planned away: engines stay awake and
trainers keep their state; the sync and the phase rules are the same.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from colocate.actors.engine import EngineActor
from colocate.actors.trainer import LossFn, TrainerActor, batch_rows, shard_batch
from colocate.algorithms.metrics import merge_metrics
from colocate.algorithms.micro_batches import plan_step
from colocate.algorithms.rollouts import Rollout, StalenessError, VersionLedger
from colocate.core.calls import Call, wait_all
from colocate.core.config import (
    ConfigError,
    EngineConfig,
    LoadFormat,
    Pipeline,
    PipelineConfig,
    Sampling,
    SyncConfig,
    TrainerConfig,
    check_engine_model,
)
from colocate.core.contract import Completion, EngineTenant, Tag, Tenant, TrainerTenant
from colocate.core.errors import ColocateError, InputError
from colocate.core.executor import Executor
from colocate.core.faults import Fault, coerce_fault
from colocate.core.fleet import Fleet
from colocate.core.handovers import (
    INIT,
    RECOVER,
    RESTART_ENGINES,
    RESTART_TRAINERS,
    ROLLOUT,
    SKIP_SYNC,
    START,
    SYNC,
    TRAIN,
    ActorId,
    Context,
    actors_of,
)
from colocate.core.phases import Phase, PhaseError, require
from colocate.core.role_driver import RoleDriver
from colocate.core.syncing import SyncDriver, SyncReport
from colocate.operations.memory_check import check_run
from colocate.operations.memory_plan import MemoryPlan
from colocate.operations.timeline import Timeline
from colocate.roles.base import Role, attach_roles
from placement import DeviceKind, Plan, Reservation, TenantKind, TopologySpec, plan, reserve
from weight_sync.buckets import default_bucket_bytes

__all__ = ["Coordinator", "SyncReport", "Timeouts"]

_ENGINE, _TRAINER, _ROLE = TenantKind.ENGINE, TenantKind.TRAINER, TenantKind.ROLE
_LOOP = (Phase.ROLLOUT, Phase.SCORE, Phase.TRAIN)


@dataclass(frozen=True)
class Timeouts:
    """Bounds on actor work, in seconds.

    Attributes:
        start_s: Creating actors (first use of DeepSpeed compiles its CPU ops: minutes).
        step_s: One transition, generate call, train step or sync.
        ping_s: Health check of every actor during recovery.
        kill_s: Confirming a killed actor dead (Ray reports it DEAD and its process is gone)
            before anything replaces it.
    """

    start_s: float = 600.0
    step_s: float = 300.0
    ping_s: float = 10.0
    kill_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("start_s", "step_s", "ping_s", "kill_s"):
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
        engine_cls: The engine actor class: an :class:`~colocate.core.contract.EngineTenant`
            (default :class:`~colocate.actors.engine.EngineActor`; the contract is in
            ``colocate.core.contract``).
        trainer_cls: The trainer actor class: a :class:`~colocate.core.contract.TrainerTenant`
            (default :class:`~colocate.actors.trainer.TrainerActor`; subclass it for custom training
            logic and keep its constructor).
        name: Prefix of actor, placement-group and rendezvous names (unique by default).
        probe: The placement probe run on each bundle (default ``placement.probe_bundle``).
        pipeline: SYNC (default) or ASYNC one-step off-policy rollouts (separate pools only).
        check_memory: Plan every phase's memory on the reserved bundles and refuse, before
            any actor starts, a run that cannot fit (:mod:`colocate.operations.memory_plan`; each
            role on its bundles, in its resident phases, from its actor class's
            ``RoleActor.footprint``).
        roles: Extra tenants (:class:`~colocate.roles.base.Role`: a reference policy, a reward
            model, a user's actor), placed beside the trainer ranks unless they name their
            own bundles, ordered by the hand-over table like the engines and trainers, and
            called with :meth:`call_role`.

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
        engine_cls: type[EngineTenant] = EngineActor,
        trainer_cls: type[TrainerTenant] = TrainerActor,
        name: str | None = None,
        probe=None,
        pipeline: PipelineConfig | None = None,
        check_memory: bool = True,
        roles: Sequence[Role] = (),
    ):
        pipeline = pipeline or PipelineConfig()
        if roles and pipeline.mode is Pipeline.ASYNC:
            raise ConfigError(
                "Coordinator(roles=...) with PipelineConfig.mode='async': roles are ordered by "
                "the synchronous loop's phases only; fix: mode='sync'"
            )
        if pipeline.mode is Pipeline.ASYNC and spec.colocate:
            raise ConfigError(
                "PipelineConfig.mode='async' overlaps rollouts with training, which needs the "
                "trainer and the engines on different GPUs, but TopologySpec.colocate=True puts "
                "them on the same ones; fix: TopologySpec(colocate=False) with GPUs for both "
                "pools, or mode='sync'"
            )
        if sleep_level not in (1, 2) or isinstance(sleep_level, bool):
            raise ConfigError(f"sleep_level={sleep_level!r}: must be 1 or 2; fix: pass 1 or 2")
        if engine.tensor_parallel_size != spec.engine_tp:
            raise ConfigError(
                f"EngineConfig.tensor_parallel_size={engine.tensor_parallel_size} but "
                f"TopologySpec.engine_tp={spec.engine_tp}; fix: make them equal"
            )
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn={loss_fn!r}: must be callable as loss_fn(model, batch)")
        for label, cls, base in (
            ("engine_cls", engine_cls, EngineTenant),
            ("trainer_cls", trainer_cls, TrainerTenant),
        ):
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ConfigError(
                    f"{label}={cls!r}: must subclass colocate.core.contract.{base.__name__}; fix: "
                    f"subclass {'EngineActor' if base is EngineTenant else 'TrainerActor'}"
                )
        if not trainer.deepspeed and spec.trainer_world_size != 1:
            raise ConfigError(
                f"TrainerConfig.deepspeed=False needs trainer_world_size=1, got "
                f"{spec.trainer_world_size}; fix: use DeepSpeed or one trainer rank"
            )
        spec = attach_roles(spec, roles, trainer.model)  # every role checked here
        self.roles: dict[str, Role] = {r.name: r for r in roles}
        self.spec = spec
        self.plan: Plan = plan(spec)
        self.engine_config = engine
        self.trainer_config = trainer
        self.loss_fn = loss_fn
        self.sync_config = sync or SyncConfig()
        self.sleep_level = sleep_level
        self.timeouts = timeouts or Timeouts()
        self.engine_cls = engine_cls
        self.trainer_cls = trainer_cls
        self.name = name or f"colocate-{uuid.uuid4().hex[:8]}"
        self.pipeline = pipeline
        self.versions = VersionLedger()  # which trainer step each weight version carries
        self._probe = probe
        self.check_memory = check_memory
        self.memory_plan: MemoryPlan | None = None  # set at start when check_memory
        check_engine_model(engine)  # the device-specific checks run once the device is known
        self.step = 0
        self.weight_version = 0 if engine.load_format is LoadFormat.AUTO else -1
        self.timeline = Timeline()
        self._exec = Executor(self.plan, self.timeline, self.timeouts.step_s, lambda: self.step)
        self.last_sync: SyncReport | None = None
        self.reservation: Reservation | None = None
        self.device: DeviceKind | None = None
        self.fleet: Fleet | None = None
        self._sync: SyncDriver | None = None
        self._roles: RoleDriver | None = None
        self._started = False

    # ----- state ------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current phase (changed only by executing a table row, a failure, or shutdown)."""
        return self._exec.phase

    @property
    def rounds(self) -> int:
        """Sequential driver rounds so far (a loop step of generate, train, sync costs 3)."""
        return self._exec.rounds

    @property
    def colocated(self) -> bool:
        """True when trainer ranks and engines share GPUs (memory hand-over needed)."""
        return bool(self.plan.shared_bundles)

    @property
    def bucket_plan(self):
        """The bucket layout of every sync (None before start)."""
        return self._sync.bucket_plan if self._sync else None

    @property
    def sync_driver(self) -> SyncDriver | None:
        """The weight-sync driver (its transfer groups and set-up rounds); None before start."""
        return self._sync

    def hardware(self) -> dict:
        """What the placement probe found on each bundle (device kind, names, memory)."""
        return self.reservation.hardware() if self.reservation else {}

    def _ctx(self, **kw) -> Context:
        return Context(
            sleep_level=self.sleep_level,
            collective_timeout_s=self.sync_config.timeout_s * 5,
            role_phases=tuple((r.name, r.phases) for r in self.roles.values()),
            **kw,
        )

    # ----- start-up ---------------------------------------------------------------------------

    def start(self) -> Coordinator:
        """Reserves GPUs, creates the actors in memory order, and runs the first sync.

        Order: reserve (the probe reports each bundle's device; device-specific config checks
        and the memory plan run now, before any actor starts); every actor is created; the
        ``start`` row builds the engines (vLLM sizes itself from the free memory) while trainer
        rank 0 hosts the trainer group's store; the ``init`` row, in the same driver wait, has
        the trainer ranks prepare at once (imports, ops, trainer group: no device memory),
        puts the engines to sleep on shared GPUs and only then has the trainer rank there
        take its memory (model and optimizer); the first sync then gives every engine the
        trainer's weights (an engine started with dummy weights never serves before it), and
        the pipeline enters ROLLOUT.

        Raises:
            PhaseError: Called twice, or after shutdown.
            MemoryPlanError: A phase cannot fit on a bundle (the reservation is released, as
                after any failure before the first actor starts).
        """
        if self._started:
            raise PhaseError(
                f"start() called twice (phase {self._exec.phase.value!r}); a coordinator starts "
                "once: create a new one for a new run"
            )
        self._started = True
        self._guard(self._start_body)
        self._collect_spans()
        return self

    def _start_body(self) -> None:
        with self._exec.span("reserve", self._exec.tag("start")):
            self.reservation = reserve(
                self.plan,
                timeout_s=min(120.0, self.timeouts.start_s),
                name=self.name,
                probe=self._probe,
            )
        try:
            self.device = self.reservation.device
            check_engine_model(self.engine_config, self.device)
            if self.check_memory:
                self.memory_plan = check_run(
                    self.engine_config,
                    self.trainer_config,
                    self.sync_config,
                    self.plan,
                    self.reservation,
                    self.sleep_level,
                    tuple(self.roles.values()),
                )
        except BaseException:
            self.reservation.release()  # nothing started: give the GPUs back now
            self.reservation = None
            raise
        self.fleet = Fleet(
            self.name,
            self.plan,
            self.reservation,
            self.engine_config,
            self.trainer_config,
            self.engine_cls,
            self.trainer_cls,
            self.loss_fn,
            self.roles,
            self.timeouts.kill_s,
        )
        self._exec.fleet = self.fleet
        self._roles = RoleDriver(
            self.roles,
            self.plan,
            self.fleet,
            self._exec,
            self._ctx,
            self.spec.nodes > 1,
            self.sync_config.timeout_s * 5,
        )
        self._sync = SyncDriver(
            self.fleet,
            self.engine_config,
            self.sync_config,
            self.timeouts.step_s,
            self.name,
            self.timeline.extend,
        )
        # Every actor is created at once: creating one (a process, its imports) takes no
        # device memory; what does is ordered by the rows below.
        for kind in (_ENGINE, _ROLE, _TRAINER):
            for a in actors_of(self.plan, kind):
                self.fleet.spawn(a)
        # One chain, one wait for both start-up rows. ``start`` goes first: the engines build
        # while trainer rank 0 hosts the group's store (``init`` needs its address); then
        # ``init``: its trainer ``prepare`` waits for nothing, and per GPU the engines sleep
        # (after their start: same actor) before the trainer rank there takes its memory.
        chain, pending = self._exec.pending()
        self._exec.add_row(chain, START, self._ctx(), pending)
        chain.submit()
        tag = self._exec.tag(INIT.name)
        master = self._trainer_group(tag)
        level = 2 if self.engine_config.load_format is LoadFormat.DUMMY else self.sleep_level
        ctx = replace(
            self._ctx(master=master, role_groups=self._roles.groups(self.roles, tag)),
            sleep_level=level,
        )
        self._exec.add_row(chain, INIT, ctx, pending)
        # Each row had this bound on its own before they ran together.
        self._exec.run_chain(chain, pending, "start", 2 * self.timeouts.start_s)
        self._sync.setup(self._exec.tag(INIT.name))
        self._sync_chain()

    def _trainer_group(self, tag: Tag) -> tuple[str, int]:
        """Trainer rank 0 hosts the trainer group's store; returns its (host, port)."""
        (master,) = self._exec.wait(
            [
                self.fleet.trainer_call(
                    0,
                    TrainerTenant.host_group_store,
                    self.spec.nodes > 1,
                    self.sync_config.timeout_s * 5,
                    tag=tag,
                )
            ],
            self.timeouts.step_s,
        )
        return master

    def _restart_trainers(self) -> None:
        """Creates every trainer rank and runs ``restart-trainers``.

        Per GPU the engines sleep, then the trainer rank there starts; the ranks prepare
        meanwhile.
        """
        for a in actors_of(self.plan, _TRAINER):
            self.fleet.spawn(a)
        master = self._trainer_group(self._exec.tag(RESTART_TRAINERS.name))
        ctx = self._ctx(master=master)
        self._exec.run(RESTART_TRAINERS, ctx, self.timeouts.start_s)

    # ----- the RL loop ------------------------------------------------------------------------

    def generate(self, prompts: Sequence, sampling: Sampling) -> list[Completion]:
        """Generates on every engine (prompts split in contiguous chunks); needs ROLLOUT.

        Returns:
            Completions in prompt order (``prompt_index`` is global), ``sampling.n`` each.
        """
        calls, tag = self._generate_calls(prompts, sampling)
        with self._exec.span("generate", tag):
            results = self._guard(lambda: self._exec.wait(calls, self.timeouts.step_s))
        return [c for completions in results for c in completions]

    def generate_async(self, prompts: Sequence, sampling: Sampling) -> Rollout:
        """Starts a generate on every engine and returns at once (pipeline ASYNC; ROLLOUT).

        The trainer may train meanwhile; the next :meth:`sync` reaches each engine after the
        rollout it is generating, so the rollout after that one gets the new weights. Every
        completion carries the weight version that produced it (staleness is enforced by
        :meth:`train`).
        """
        if self.pipeline.mode is not Pipeline.ASYNC:
            raise PhaseError(
                "generate_async needs PipelineConfig(mode='async') (separate pools); with "
                "mode='sync' call generate()"
            )
        calls, tag = self._generate_calls(prompts, sampling)
        self._exec.rounds += 1
        refs = [c.start() for c in calls]

        def wait() -> list:
            spans: list = []
            try:
                results = self._guard(
                    lambda: wait_all(calls, self.timeouts.step_s, refs=refs, spans=spans)
                )
            finally:
                self.timeline.extend(spans)
            return [c for completions in results for c in completions]

        return Rollout(wait)

    def _generate_calls(self, prompts: Sequence, sampling: Sampling) -> tuple[list[Call], Tag]:
        require(self._exec.phase, Phase.ROLLOUT, "generate")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        n = self.spec.engines
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        used = [e for e in range(n) if bounds[e + 1] > bounds[e]]
        tag = self._exec.tag(Phase.ROLLOUT.value)
        calls = [
            self.fleet.engine_call(
                e,
                EngineTenant.generate,
                prompts[bounds[e] : bounds[e + 1]],
                sampling,
                bounds[e],
                tag=tag,
            )
            for e in used
        ]
        return calls, tag

    def train(self, batch: dict) -> dict[str, float]:
        """The ``train`` row if needed, then one train step on every rank; returns rank means.

        One driver wait: each rank's step is chained after its reload (same actor). The batch
        (a dict of tensors or lists, one row per sequence) is cut into contiguous shards on the
        driver; each rank receives only its own.
        """
        require(self._exec.phase, _LOOP, "train")
        staleness = self._staleness(batch)
        world = self.spec.trainer_world_size
        shards = [shard_batch(batch, r, world) for r in range(world)]  # bad input raises here
        max_rows = max(batch_rows(s) for s in shards)
        cfg = self.trainer_config
        plan_step(max_rows, max_rows, cfg.mini_batches, cfg.micro_batch_size)  # raises here too
        chain, pending = self._exec.pending()
        self._exec.add_row(chain, TRAIN, self._ctx(), pending)
        self.step += 1
        tag = self._exec.tag(Phase.TRAIN.value)
        steps = [
            chain.add(
                self.fleet.trainer_call(r, TrainerTenant.train_step, shards[r], max_rows, tag=tag)
            )
            for r in range(world)
        ]
        try:
            results = self._guard(lambda: self._exec.run_chain(chain, pending, "train"))
        except (InputError, PhaseError):
            self.step -= 1  # refused: no optimizer step was taken
            raise
        metrics = [results[i] for i in steps]
        out = merge_metrics(metrics)  # means over the ranks; maxima for *_max metrics
        if staleness is not None:
            out["staleness"] = float(staleness)
        return out

    def call_role(self, role: str, verb, *args, shard: bool = True):
        """Calls ``verb`` (a method of the role's actor class) on every rank of ``role``.

        The role must be resident in the current phase; from ROLLOUT, a role resident in SCORE
        is reached through the ``score`` row (engines sleep on its GPUs, then it reloads) in
        the same driver wait as the calls.

        Args:
            role: The role's name.
            verb: The method itself (e.g. ``ReferenceActor.logprobs``), never a string.
            args: With ``shard`` the first is a batch (a dict, one row per sequence), cut into
                one contiguous shard per rank; the rest go to every rank as they are.
            shard: Cut the batch and concatenate the ranks' answers (tensors or lists) in row
                order; False: every rank gets ``args`` and the answers come back as a list.
        """
        require(self._exec.phase, _LOOP + (Phase.SYNC,), f"call_role({role!r})")
        run = self._roles.call(role, verb, args, shard)  # bad input raises here
        return self._guard(run)

    def resume(self, checkpoint: str, weight_version: int) -> SyncReport:
        """Brings this (started) pipeline to a saved run: the trainers load ``checkpoint``.

        Order: the ``train`` row (engines sleep, trainers reload), every rank loads the
        checkpoint (model, optimizer and step count, as :meth:`save_trainer` wrote them; a
        stateful role, the critic, loads ``<checkpoint>/<role>`` in the same chain), the
        step counter becomes the checkpoint's, and a verified sync (version
        ``weight_version + 1``) gives every engine those weights before it serves again.

        Args:
            checkpoint: A directory written by :meth:`save_trainer`.
            weight_version: The engines' version when it was written (numbering continues).
        """
        require(self._exec.phase, _LOOP, "resume")
        self._roles.check_checkpoint(checkpoint)  # before anything moves
        chain, pending = self._exec.pending()
        self._exec.add_row(chain, TRAIN, self._ctx(), pending)
        tag = self._exec.tag("resume")
        loads = [
            chain.add(self.fleet.call(a, TrainerTenant.load, checkpoint, tag=tag))
            for a in actors_of(self.plan, _TRAINER)
        ]
        self._roles.add_loads(chain, checkpoint, tag)
        results = self._guard(lambda: self._exec.run_chain(chain, pending, "resume"))
        self.step = results[loads[0]]
        self.weight_version = weight_version
        self._guard(self._sync_chain)
        return self.last_sync

    def _staleness(self, batch: dict) -> int | None:
        """The batch's staleness (from its ``weight_version`` rows, if any); enforced (ASYNC).

        Raises:
            StalenessError: More than ``PipelineConfig.max_staleness`` in ASYNC mode (before
                anything runs).
        """
        versions = batch.get("weight_version")
        if versions is None:
            return None
        versions = [
            int(v) for v in (versions.tolist() if hasattr(versions, "tolist") else versions)
        ]
        staleness = self.versions.staleness(versions, self.step)
        bound = self.pipeline.max_staleness
        if self.pipeline.mode is Pipeline.ASYNC and staleness is not None and staleness > bound:
            raise StalenessError(
                f"the batch was generated with weight version {min(versions)}, {staleness} "
                f"optimizer steps behind the trainer (step {self.step}); "
                f"PipelineConfig.max_staleness={bound}; fix: sync() after every train(), or "
                "raise max_staleness"
            )
        return staleness

    def sync(self) -> SyncReport:
        """TRAIN (or ROLLOUT) -> SYNC -> ROLLOUT: sends the trainer's weights to every engine.

        One driver wait for the ``train`` row (from ROLLOUT), the ``sync`` row, the transfer
        and its verification in each engine, and the ``rollout`` row (the spans come back with
        the answers).
        """
        require(self._exec.phase, _LOOP, "sync")
        self._guard(self._sync_chain)
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
        require(self._exec.phase, _LOOP, "skip_sync")
        chain, pending = self._exec.pending()
        self._exec.add_row(chain, SKIP_SYNC, self._ctx(), pending)
        self._guard(lambda: self._exec.run_chain(chain, pending, "skip_sync"))

    def _sync_chain(self) -> None:
        """Rows ``train`` (from ROLLOUT) and ``sync``; the transfer; row ``rollout``.

        Each engine takes the new version only after it verified what it received; the
        coordinator's ``weight_version`` follows once every engine did.
        """
        chain, pending = self._exec.pending()
        self._exec.add_row(chain, TRAIN, self._ctx(), pending)
        self._exec.add_row(chain, SYNC, self._ctx(), pending)
        version = self.weight_version + 1 if self.weight_version >= 0 else 1
        steps = self._sync.add_transfer(chain, version, self._exec.tag(Phase.SYNC.value))
        self._exec.add_row(chain, ROLLOUT, self._ctx(), pending)
        results = self._exec.run_chain(chain, pending, "sync")
        self.weight_version = version
        self.versions.record(version, self.step)
        self.last_sync = self._sync.report(steps, results)

    def _guard(self, fn):
        """Runs ``fn``; any failure but refused input or a wrong-phase call leaves FAILED.

        Spans normally come back with each call's answer; after a failure here they are
        collected from every actor (the answers of the calls that failed carry none).
        """
        try:
            return fn()
        except (InputError, PhaseError):
            # Refused before anything moved: the pipeline stays where it was (a refusal that
            # came back after a hand-over ran was marked FAILED by the executor already).
            raise
        except BaseException:
            if self._exec.phase is Phase.SHUTDOWN:  # e.g. a rollout awaited after shutdown
                raise
            self._exec.fail()
            # Peers of a dead actor may sit in a collective until its timeout: do not wait for
            # their spans here (they come with a later collection).
            self._collect_spans(timeout_s=1.0)
            raise

    # ----- recovery ---------------------------------------------------------------------------

    def recover(self, checkpoint: str | None = None) -> SyncReport:
        """From FAILED: replaces dead actors, re-sends the trainer's weights, enters ROLLOUT.

        Order: (1) ping every actor; (2) if a trainer rank died, its ZeRO shard is gone: every
        rank is killed, to be replaced and restored from ``checkpoint`` (required then); (3)
        each dead engine is replaced on its bundle (``restart-engines`` row: on a shared GPU
        the trainer offloads first, then the new engine starts); (4) replaced trainer ranks
        start (``restart-trainers`` row: engines sleep first) and load the checkpoint; (5) the
        ``recover`` row (engines sleep, trainers reload); a dead role's rank is replaced and
        rebuilt from its config before (4) (``restart-roles`` row: in host memory, so nothing
        on its GPU is taken); (6) the transfer groups are rebuilt
        and a verified sync brings every engine to the trainer's weights.

        Args:
            checkpoint: A directory written by :meth:`save_trainer`; needed only when a
                trainer rank died.

        Raises:
            ColocateError: A trainer rank died and no checkpoint was given (stays FAILED).
        """
        require(self._exec.phase, Phase.FAILED, "recover")
        if self.fleet is None:
            raise PhaseError(
                "recover(): start() failed before any actor was created, so there is nothing "
                "to recover; fix: create a new Coordinator and start it"
            )
        # A survivor may still be blocked in the failed transfer until the transfer timeout:
        # wait that long for its answer before calling it dead.
        ping = max(self.timeouts.ping_s, self.sync_config.timeout_s + 5.0)
        dead = self.fleet.dead(ping)
        dead_engines = [a for a in dead if a.kind is _ENGINE]
        dead_trainers = [a for a in dead if a.kind is _TRAINER]
        dead_roles = [a for a in dead if a.kind is _ROLE]
        if dead_trainers and checkpoint is None:
            ranks = [a.index for a in dead_trainers]
            raise ColocateError(
                f"trainer rank(s) {ranks} died and took their ZeRO shards with them; fix: "
                "call recover(checkpoint=...) with a directory written by save_trainer()",
                actor=dead_trainers[0].name,
                phase=self._exec.phase.value,
                step=self.step,
            )

        def body() -> None:
            absent: frozenset[ActorId] = frozenset()
            failed = dict(phase=Phase.FAILED.value, step=self.step)
            if dead_trainers:
                # Survivors are in a broken DeepSpeed group too: every rank goes.
                self.fleet.kill(*actors_of(self.plan, _TRAINER), **failed)
                absent = frozenset(actors_of(self.plan, _TRAINER))
            if dead_engines:
                # Each replacement starts only once its predecessor is confirmed gone.
                self.fleet.kill(*dead_engines, **failed)
                for a in dead_engines:
                    self.fleet.spawn(a)
                ctx = self._ctx(selected=frozenset(dead_engines), absent=absent)
                self._exec.run(RESTART_ENGINES, ctx, self.timeouts.start_s)
            if dead_roles:  # rebuilt from their configs (model paths, the critic's checkpoint)
                self._roles.restart(
                    dead_roles, checkpoint, absent, self.timeouts.start_s, self.step
                )
            if dead_trainers:
                self._restart_trainers()
                tag = self._exec.tag(RESTART_TRAINERS.name)
                steps = self._exec.wait(
                    [
                        self.fleet.call(a, TrainerTenant.load, checkpoint, tag=tag)
                        for a in actors_of(self.plan, _TRAINER)
                    ],
                    self.timeouts.step_s,
                )
                self.step = steps[0]  # the trainers are back at the checkpoint's step
            self._exec.run(RECOVER, self._ctx())
            # A failed transfer may have left a group half-used: always rebuild the groups.
            self._sync.setup(self._exec.tag(RECOVER.name))
            self._sync_chain()

        self._guard(body)
        self._collect_spans()
        return self.last_sync

    # ----- observation, checkpoints, shutdown -------------------------------------------------

    def _collect_spans(self, timeout_s: float = 30.0) -> None:
        if self.fleet is not None:
            with self._exec.span("collect_spans", self._exec.tag(self._exec.phase.value)):
                self._exec.rounds += 1
                spans = self.fleet.drain_spans(timeout_s)
            self.timeline.extend(spans)
        self.timeline.extend(self._exec.recorder.drain())

    def actor_status(self) -> dict[str, dict]:
        """Each live actor's status: memory state, pid, RSS, open fds, threads."""
        return self.fleet.statuses() if self.fleet else {}

    def inject_fault(self, actor: str, fault: Fault | str) -> None:
        """Test hook: arms ``fault`` (a :class:`~colocate.core.faults.Fault`) in ``actor``.

        ``actor`` is a name like ``"engine1"``, ``"trainer0"`` or ``"reference0"``; each fault
        goes to its kind of actor (anything else is refused).
        """
        fault = coerce_fault(fault)
        target = ActorId.parse(actor, frozenset(self.roles))
        if target.kind is not fault.kind:
            raise ValueError(
                f"fault {fault.value!r} is armed in a {fault.kind.value}, not in {actor!r}"
            )
        call = self.fleet.call(target, Tenant.inject_fault, fault, tag=self._exec.tag("fault"))
        self._exec.wait([call], self.timeouts.step_s)

    def _on_trainers(self, verb, *args) -> list:
        tag = self._exec.tag(self._exec.phase.value)
        calls = [self.fleet.call(a, verb, *args, tag=tag) for a in actors_of(self.plan, _TRAINER)]
        return self._exec.wait(calls, self.timeouts.step_s)

    def trainer_fingerprints(self) -> dict:
        """Fingerprints of the trainer's full parameters (to prove its state is intact)."""
        return self._on_trainers(TrainerTenant.param_fingerprints, self._chunk_bytes())[0]

    def save_trainer(self, path: str) -> str:
        """Checkpoints every trainer rank under ``path`` (model, optimizer, step).

        A stateful role (the critic) is saved beside it, under ``path/<role>``.
        """
        self._on_trainers(TrainerTenant.save, path)
        if self._roles is not None:
            self._roles.save(path, self._exec.tag(self._exec.phase.value))
        return path

    def export_hf(self, path: str) -> str:
        """Writes the trainer's current weights as an HF directory in the engine dtype."""
        dtype = self.engine_config.dtype.value
        self._on_trainers(TrainerTenant.export_hf, path, dtype, self._chunk_bytes())
        return path

    def _chunk_bytes(self) -> int:
        """What fingerprints and exports gather at once: the sync's bucket size."""
        driver = self.sync_driver
        if driver is not None:
            return driver.bucket_bytes
        return self.sync_config.bucket_bytes or default_bucket_bytes(self.device)

    def shutdown(self) -> None:
        """Stops every actor and releases the GPUs. Idempotent; never raises for dead actors.

        Raises:
            ActorNotDeadError: An actor was not confirmed dead within ``Timeouts.kill_s`` (the
                GPUs are released all the same).
        """
        if self._exec.phase is Phase.SHUTDOWN:
            return
        try:
            if self.fleet is not None:
                self._collect_spans()
                self.fleet.shutdown()
        finally:
            if self.reservation is not None:
                self.reservation.release()
                self.reservation = None
            self._exec.close()
            self._started = True

    def __enter__(self) -> Coordinator:
        try:
            return self.start()
        except BaseException:
            self.shutdown()  # __exit__ does not run when __enter__ raises: release everything
            raise

    def __exit__(self, *exc) -> None:
        self.shutdown()
