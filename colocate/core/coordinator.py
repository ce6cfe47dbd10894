"""The coordinator: the one owner of ordering, and the loop API (generate, train, sync).

Each call executes rows of the hand-over table (``colocate.core.handovers``) through the
executor in one bounded driver wait (the RL step: ``docs/design.md``). Configuration:
``run_config``; the started parts: ``runtime``; start, resume, recovery, shutdown: ``lifecycle``.
"""

from __future__ import annotations

from collections.abc import Sequence

from colocate.algorithms.batches import shard_for_ranks
from colocate.algorithms.metrics import merge_metrics
from colocate.algorithms.rollouts import Rollout
from colocate.core import lifecycle
from colocate.core.config import LoadFormat, Sampling
from colocate.core.contract import Completion, TrainerTenant
from colocate.core.errors import InputError
from colocate.core.executor import Executor
from colocate.core.faults import Fault
from colocate.core.handovers import SKIP_SYNC, TRAIN
from colocate.core.phases import Phase, PhaseError, require
from colocate.core.rollout_driver import RolloutDriver
from colocate.core.run_config import RunConfig, SleepLevel, Timeouts
from colocate.core.runtime import Progress, Runtime, build_runtime
from colocate.core.syncing import SyncReport
from colocate.operations.timeline import Timeline
from placement import plan

__all__ = ["Coordinator", "SyncReport", "Timeouts"]

_LOOP = (Phase.ROLLOUT, Phase.SCORE, Phase.TRAIN)


class Coordinator:
    """Runs trainer ranks, vLLM engines and roles on one topology, in phase order.

    Args:
        spec: Which GPUs the trainer ranks and engines use.
        engine: Engine configuration (shared by all engines).
        trainer: Trainer configuration (shared by all ranks).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``, a module-level function.
        options: The other fields of :class:`~colocate.core.run_config.RunConfig` by name
            (``sync``, ``sleep_level``, ``timeouts``, ``engine_cls``, ``trainer_cls``, ``name``,
            ``probe``, ``pipeline``, ``check_memory``, ``roles``); None takes the default.

    Raises:
        ConfigError: An inconsistent configuration (before anything starts).
        TopologyError: An invalid topology (before anything starts).
    """

    def __init__(self, spec, engine, trainer, loss_fn, **options):
        self.config = RunConfig.of(spec, engine, trainer, loss_fn, **options)
        self.spec = self.config.spec  # with the roles' placements
        self.name = self.config.name
        self.plan = plan(self.spec)
        self.timeline = Timeline()
        auto = self.config.engine.load_format is LoadFormat.AUTO
        self._progress = Progress(weight_version=0 if auto else -1)
        step_s = self.config.timeouts.step_s
        self._exec = Executor(self.plan, self.timeline, step_s, lambda: self._progress.step)
        self._rt: Runtime | None = None
        self._started = False
        #: Generation for the pipeline; in PARTIAL mode it holds every group in flight.
        self.rollouts = RolloutDriver(self.config, self._exec, self._progress, self.timeline)

    # ----- state ------------------------------------------------------------------------------

    phase = property(lambda self: self._exec.phase, doc="The current phase (set by the executor).")
    rounds = property(lambda self: self._exec.rounds, doc="Sequential driver rounds so far.")
    step = property(lambda self: self._progress.step, doc="Optimizer steps taken.")
    weight_version = property(lambda self: self._progress.weight_version, doc="Served version.")
    last_sync = property(lambda self: self._progress.last_sync, doc="The last sync's report.")
    fleet = property(lambda self: self._rt and self._rt.fleet, doc="The actors (after start).")
    reservation = property(lambda self: self._rt and self._rt.reservation, doc="The bundles.")
    memory_plan = property(lambda self: self._rt and self._rt.memory_plan, doc="Checked plan.")
    device = property(lambda self: self._rt and self._rt.reservation.device, doc="Device kind.")
    sync_driver = property(lambda self: self._rt and self._rt.sync, doc="The sync driver.")
    bucket_plan = property(lambda self: self._rt and self._rt.sync.bucket_plan, doc="Buckets.")

    colocated = property(lambda self: bool(self.plan.shared_bundles), doc="GPUs are shared.")

    def hardware(self) -> dict:
        """What the placement probe found on each bundle (device kind, names, memory)."""
        return self._rt.reservation.hardware() if self._rt else {}

    # ----- start, resume, recover -------------------------------------------------------------

    def start(self) -> Coordinator:
        """Reserves GPUs, checks the run on them, creates the actors, runs the first sync.

        See :func:`colocate.core.runtime.build_runtime` (reservation, device checks and the
        memory plan, before any actor starts) and :func:`colocate.core.lifecycle.start`.

        Raises:
            PhaseError: Called twice, or after shutdown.
            MemoryPlanError: A phase cannot fit on a bundle (the reservation is released).
        """
        if self._started:
            raise PhaseError(
                f"start() called twice (phase {self.phase.value!r}); a coordinator starts "
                "once: create a new one for a new run"
            )
        self._started = True

        def body() -> None:
            self._rt = build_runtime(self.config, self.plan, self._exec, self._progress)
            lifecycle.start(self._rt)

        self._guard(body)
        self._collect_spans()
        return self

    def resume(self, checkpoint: str, weight_version: int) -> SyncReport:
        """Brings this (started) pipeline to a saved run (:func:`lifecycle.resume`).

        Args:
            checkpoint: A directory written by :meth:`save_trainer`.
            weight_version: The engines' version when it was written (numbering continues).
        """
        require(self.phase, _LOOP, "resume")
        self._guard(lambda: lifecycle.resume(self._rt, checkpoint, weight_version))
        return self.last_sync

    def recover(self, checkpoint: str | None = None) -> SyncReport:
        """From FAILED: replaces dead actors, re-sends the trainer's weights, enters ROLLOUT.

        Every actor is pinged first (:func:`colocate.core.lifecycle.find_dead`), then
        :func:`colocate.core.lifecycle.recover` replaces the dead.

        Args:
            checkpoint: A directory written by :meth:`save_trainer`; needed only when a
                trainer rank (or a stateful role) died.

        Raises:
            ColocateError: A trainer rank died and no checkpoint was given (stays FAILED).
        """
        require(self.phase, Phase.FAILED, "recover")
        if self._rt is None:
            raise PhaseError(
                "recover(): start() failed before any actor was created, so there is nothing "
                "to recover; fix: create a new Coordinator and start it"
            )
        dead = lifecycle.find_dead(self._rt, checkpoint)  # not guarded: stays FAILED
        self._guard(lambda: lifecycle.recover(self._rt, dead, checkpoint))
        self._collect_spans()
        return self.last_sync

    # ----- the RL loop ------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence, sampling: Sampling, groups: int | None = None
    ) -> list[Completion]:
        """Generates ``sampling.n`` completions per prompt on the engines; needs ROLLOUT.

        SYNC/ASYNC: the prompts split in contiguous chunks, completions in prompt order
        (``prompt_index`` global). PARTIAL: the prompts join the groups in flight and
        ``groups`` complete groups come back (default one per prompt), the oldest first
        (:meth:`RolloutDriver.generate_partial`; ``rollouts.wanted()`` prompts keep the
        engines full; figures in ``rollouts.stats``).
        """
        run = self.rollouts.generate
        return self._guard(lambda: run(self.fleet, prompts, sampling, groups))

    def run_episodes(
        self, rows: Sequence, agent, sampling: Sampling, groups: int | None = None
    ) -> list:
        """Runs ``sampling.n`` agent episodes per row on the engines (``colocate.agents``).

        Needs ROLLOUT; ``agent`` is an ``AgentConfig``. Every episode is finished, or in PARTIAL
        mode paused with its tokens kept, when this returns
        (:meth:`RolloutDriver.run_episodes`). Returns ``EpisodeResult`` per episode, group by
        group (``completion.loss_mask`` 0 on observation tokens).
        """
        run = self.rollouts.run_episodes
        return self._guard(lambda: run(self.fleet, rows, agent, sampling, groups))

    def evaluate_episodes(self, rows: Sequence, agent, sampling: Sampling) -> list:
        """Agent episodes for evaluation, each to its end; PARTIAL's paused ones left alone."""
        run = self.rollouts.evaluate_episodes
        return self._guard(lambda: run(self.fleet, rows, agent, sampling))

    def evaluate(self, prompts: Sequence, sampling: Sampling) -> list[Completion]:
        """Generates for evaluation on the served weights (ROLLOUT; the trainer stays offloaded).

        Like a SYNC generate in every pipeline: PARTIAL's groups in flight are left alone.
        """
        run = self.rollouts.evaluate
        return self._guard(lambda: run(self.fleet, prompts, sampling))

    def generate_async(self, prompts: Sequence, sampling: Sampling) -> Rollout:
        """Starts a generate on every engine and returns at once (pipeline ASYNC; ROLLOUT).

        The trainer may train meanwhile; the next :meth:`sync` reaches each engine after the
        rollout it is generating. Every completion carries the weight version that produced
        it (staleness is enforced by :meth:`train`).
        """
        return self.rollouts.generate_async(self.fleet, prompts, sampling, self._guard)

    def train(self, batch: dict) -> dict[str, float]:
        """The ``train`` row if needed, then one train step on every rank; returns rank means.

        One driver wait: each rank's step is chained after its reload (same actor). The batch
        (a dict of tensors or lists, one row per sequence) is cut into shards on the driver
        (contiguous rows; of near-equal tokens with a token budget); each rank receives only
        its own, and every rank is told the largest shard.
        """
        require(self.phase, _LOOP, "train")
        bound = self.config.pipeline.staleness_bound
        staleness = self._progress.versions.batch_staleness(batch, self.step, bound)
        cfg, world = self.config.trainer, self.spec.trainer_world_size
        # Bad input raises here, before anything moves.
        shards, max_rows = shard_for_ranks(
            batch, world, cfg.mini_batches, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch
        )
        step = self._rt.step().row(TRAIN, self.config.context())
        self._progress.step += 1
        tag = self._exec.tag(Phase.TRAIN.value)
        train_step = TrainerTenant.train_step
        ranks = [
            step.add(self.fleet.trainer_call(r, train_step, shards[r], max_rows, tag=tag))
            for r in range(world)
        ]
        try:
            results = self._guard(lambda: step.run("train"))
        except (InputError, PhaseError):
            self._progress.step -= 1  # refused: no optimizer step was taken
            raise
        out = merge_metrics([results[i] for i in ranks])  # means; maxima for *_max metrics
        if staleness is not None:
            out["staleness"] = float(staleness)
        return out

    def call_role(self, role: str, verb, *args, shard: bool = True):
        """Calls ``verb`` (a method of the role's actor class) on every rank of ``role``.

        The role must be resident in the current phase; from ROLLOUT, a role resident in SCORE
        is reached through the ``score`` row in the same driver wait as the calls. A verb
        that is not a method of the role's class is refused here, before anything moves.

        Args:
            role: The role's name.
            verb: The method itself (e.g. ``ReferenceActor.logprobs``), never a string.
            args: With ``shard`` the first is a batch (a dict, one row per sequence), cut into
                one contiguous shard per rank; the rest go to every rank as they are.
            shard: Cut the batch and concatenate the ranks' answers (tensors or lists) in row
                order; False: every rank gets ``args`` and the answers come back as a list.
        """
        require(self.phase, _LOOP + (Phase.SYNC,), f"call_role({role!r})")
        run = self._rt.roles.call(role, verb, args, shard)  # bad input raises here
        return self._guard(run)

    def sync(self) -> SyncReport:
        """TRAIN (or ROLLOUT) -> SYNC -> ROLLOUT: sends the trainer's weights to every engine.

        One driver wait for the ``train`` row (from ROLLOUT), the ``sync`` row, the transfer
        and its verification in each engine, and the ``rollout`` row.
        """
        require(self.phase, _LOOP, "sync")
        return self._guard(self._rt.sync_weights)

    def skip_sync(self) -> None:
        """TRAIN -> ROLLOUT without sending weights: engines keep the weights they had.

        Only with sleep level 1 (a host copy of the weights survives the sleep).
        """
        if self.config.sleep_level is not SleepLevel.KEEP_WEIGHTS and self.colocated:
            raise PhaseError(
                "skip_sync needs sleep_level=1: at level 2 the engines dropped their weights; "
                "call sync() instead"
            )
        require(self.phase, _LOOP, "skip_sync")
        step = self._rt.step().row(SKIP_SYNC, self.config.context())
        self._guard(lambda: step.run("skip_sync"))

    def _guard(self, fn):
        """Runs ``fn``; any failure but refused input or a wrong-phase call leaves FAILED."""
        try:
            return fn()
        except (InputError, PhaseError):
            # Refused before anything moved: the pipeline stays where it was (a refusal that
            # came back after a hand-over ran was marked FAILED by the executor already).
            raise
        except BaseException:
            if self.phase is Phase.SHUTDOWN:  # e.g. a rollout awaited after shutdown
                raise
            self._exec.fail()
            # Peers of a dead actor may sit in a collective until its timeout: do not wait for
            # their spans here (they come with a later collection).
            self._collect_spans(timeout_s=1.0)
            raise

    # ----- observation, checkpoints, shutdown -------------------------------------------------

    def _collect_spans(self, timeout_s: float = 30.0) -> None:
        if self._rt is not None:
            self._rt.collect_spans(timeout_s)
        self.timeline.extend(self._exec.recorder.drain())

    def actor_status(self) -> dict[str, dict]:
        """Each live actor's status: memory state, pid, RSS, open fds, threads."""
        return self._rt.fleet.statuses() if self._rt else {}

    def inject_fault(self, actor: str, fault: Fault | str) -> None:
        """Test hook: arms ``fault`` in ``actor`` (see :meth:`Runtime.inject_fault`)."""
        self._rt.inject_fault(actor, fault)

    def trainer_fingerprints(self) -> dict:
        """Fingerprints of the trainer's full parameters (to prove its state is intact)."""
        chunk = self._rt.sync.bucket_bytes
        return self._rt.on_trainers(TrainerTenant.param_fingerprints, chunk)[0]

    def save_trainer(self, path: str) -> str:
        """Checkpoints every stateful group (trainer ranks; a critic under ``path/<role>``)."""
        self._rt.save(path)
        return path

    def export_hf(self, path: str) -> str:
        """Writes the trainer's current weights as an HF directory in the engine dtype."""
        dtype = self.config.engine.dtype.value
        self._rt.on_trainers(TrainerTenant.export_hf, path, dtype, self._rt.sync.bucket_bytes)
        return path

    def shutdown(self) -> None:
        """Stops every actor and releases the GPUs. Idempotent; never raises for dead actors.

        Raises:
            ActorNotDeadError: An actor was not confirmed dead within ``Timeouts.kill_s`` (the
                GPUs are released all the same).
        """
        if self.phase is Phase.SHUTDOWN:
            return
        try:
            if self._rt is not None:
                lifecycle.shutdown(self._rt)
        finally:
            self.timeline.extend(self._exec.recorder.drain())
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
