"""The runner's two stages: :func:`prepare` (every check, before Ray) and :func:`run`.

:func:`prepare` resolves the model, builds the library's configs, loads and tokenizes the data,
imports every reward function, reads a checkpoint to resume and asks the Ray address; any
problem is a :class:`~colocate.runner.schema.RecipeError` (``colocate-rl`` exits 2 with it)
and nothing has started. :func:`run` then connects to Ray, starts the coordinator and the
reward workers, and runs the steps (:class:`~colocate.runner.steps.StepRunner`) with
evaluation (:class:`~colocate.runner.evaluation.Evaluator`), HF exports and whole-run
checkpoints at their intervals; metrics go to ``OUT/metrics.jsonl``, TensorBoard (and W&B),
evaluations to ``OUT/eval.jsonl`` as well; the timeline to ``OUT/timeline.{json,png}``, the
reward curve to ``OUT/reward_curve.png`` and the run's summary to ``OUT/summary.json``
(:mod:`colocate.runner.summary`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colocate.runner.schema import RecipeError, RunnerConfig

__all__ = ["Prepared", "prepare", "run"]


@dataclass(frozen=True)
class Prepared:
    """A checked run, ready to start.

    Attributes:
        config: The recipe.
        model: The policy's local directory.
        tokenizer: Its tokenizer (the driver decodes completions for the reward functions).
        libs: The library's configs (:func:`colocate.runner.build.library_configs`).
        train: The train prompts.
        eval: The eval prompts (None: no eval split).
        reward_names: The reward functions' names (metric keys).
        state: The checkpoint to resume (None: a new run).
        gpus: GPUs of the run (throughput per GPU).
    """

    config: RunnerConfig
    model: str
    tokenizer: Any
    libs: Any
    train: Any
    eval: Any
    reward_names: list
    state: Any
    gpus: int

    @property
    def pad_id(self) -> int:
        """The token right-padded batches are filled with."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def decode(self, token_ids) -> str:
        """A completion's text as the reward functions get it (special tokens skipped)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _check_out(out: str) -> None:
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise RecipeError(
            "out", out, f"cannot be written ({exc.strerror or exc})", "pass a writable directory"
        ) from None


def _check_address(cfg: RunnerConfig) -> None:
    from colocate.operations.cli import address_answers

    key, address = "cluster.address", cfg.cluster.address
    if address is None and os.environ.get("RAY_ADDRESS"):
        key, address = "RAY_ADDRESS", os.environ["RAY_ADDRESS"]
    if address is None:
        return
    why = address_answers(address)
    if why:
        raise RecipeError(key, address, why, "start the cluster (`ray start --head`) or fix it")


def _resume(cfg: RunnerConfig):
    path = cfg.checkpoint.resume
    if path is None:
        return None
    from colocate.operations.run_state import load_run

    try:
        state = load_run(Path(path))
    except (FileNotFoundError, ValueError) as exc:
        # load_run's own fix names the example's flag (--save-every); the recipe's key replaces it
        problem = str(exc).split("; fix: ")[0]
        fix = "pass the OUT dir of a run saved with checkpoint.save_every, or its checkpoints/stepN"
        raise RecipeError("checkpoint.resume", path, problem, fix) from None
    if state.next_step >= cfg.steps:
        raise RecipeError(
            "steps",
            cfg.steps,
            f"the run to resume already has {state.next_step} steps",
            f"pass steps above {state.next_step}",
        )
    return state


def _check_eval(cfg: RunnerConfig, eval_data, names: list[str]) -> None:
    if cfg.eval.every and eval_data is None:
        raise RecipeError(
            "eval.every",
            cfg.eval.every,
            "there is no eval split",
            "pass data.eval=FILE or data.eval_size=N, or eval.every=0",
        )
    if cfg.eval.every and not names and cfg.agent.env is None:
        raise RecipeError(
            "eval.every",
            cfg.eval.every,
            "evaluation scores with the reward functions, and there are none",
            "add reward.functions, or pass eval.every=0",
        )
    metric = cfg.algorithm.filter_metric
    if metric == "env" and cfg.agent.env is None:
        raise RecipeError(
            "algorithm.filter_metric", metric, "is the environment's reward", "set agent.env"
        )
    if metric is not None and metric != "env" and metric not in names:
        raise RecipeError(
            "algorithm.filter_metric", metric, "names no reward function", f"pass one of {names}"
        )


def _check_data_order(cfg: RunnerConfig, state, rows: int, seed: int) -> None:
    """The checkpoint's data order must continue on this recipe's data (same rows, seed)."""
    from colocate.runner.data import PromptSampler

    try:
        PromptSampler(rows, seed, cfg.data.shuffle).restore(state.task["sampler"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RecipeError(
            "checkpoint.resume",
            cfg.checkpoint.resume,
            f"its data order does not continue on this recipe's data ({exc!s})",
            "resume with the saved run's data.train, data.seed and data.shuffle",
        ) from None


def prepare(config: RunnerConfig) -> Prepared:
    """Checks everything that can be checked before Ray starts; see the module docstring.

    Order: the model, the reward model's directory, the library configs and the
    coordinator's own checks of them, the data (its length budget included), the reward
    functions, evaluation's needs, the output directory, the checkpoint to resume, the Ray
    address.

    Raises:
        RecipeError: Naming the recipe key, the value and the fix.
    """
    from transformers import AutoTokenizer

    from colocate.runner.build import check_run, library_configs, resolve_model
    from colocate.runner.data import load_data
    from colocate.runner.reward_specs import check_functions

    cfg = config
    model = resolve_model(cfg.model)
    rm = cfg.reward.model
    if rm is not None and not (Path(rm) / "config.json").is_file():
        raise RecipeError(
            "reward.model", rm, "is not a model directory (no config.json)", "pass a local dir"
        )
    tokenizer = AutoTokenizer.from_pretrained(model)
    libs = library_configs(cfg, model)
    check_run(cfg, libs)
    rollout = cfg.rollout
    budget = cfg.data.max_prompt_tokens or rollout.max_model_len - rollout.max_tokens
    if budget + rollout.max_tokens > rollout.max_model_len:
        raise RecipeError(
            "data.max_prompt_tokens",
            budget,
            f"plus rollout.max_tokens={rollout.max_tokens} exceeds "
            f"rollout.max_model_len={rollout.max_model_len}",
            f"pass at most {rollout.max_model_len - rollout.max_tokens}",
        )
    seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed
    train, eval_data = load_data(cfg.data, tokenizer, budget, seed)
    names = check_functions(cfg.reward) if cfg.reward.functions else []
    _check_eval(cfg, eval_data, names)
    _check_out(cfg.out)
    state = _resume(cfg)
    if state is not None:
        _check_data_order(cfg, state, len(train), seed)
    _check_address(cfg)
    cluster = cfg.cluster
    gpus = cluster.trainer_gpus + cluster.engine_gpus if cluster.separate else cluster.gpus
    return Prepared(cfg, model, tokenizer, libs, train, eval_data, names, state, gpus)


def _bar(row: dict) -> dict:
    return {
        "reward": f"{row['reward']:.3f}",
        "len": f"{row.get('response_length/mean', 0):.0f}",
        "gen": f"{row['timing_s/gen']:.1f}s",
        "train": f"{row['timing_s/train']:.1f}s",
        "sync": f"{row['timing_s/sync']:.1f}s",
    }


def run(prepared: Prepared, announce: bool = True) -> dict:
    """Runs the prepared recipe to ``steps``; returns (and writes) its summary.

    Order: connect to Ray; start the coordinator (and with it every actor, the first sync
    included) and the reward workers; on resume, the checkpoint's weights reach the engines
    by a verified sync and the data order, the groups in flight and the metrics continue;
    an evaluation before the first step (``eval.at_start``); then each step, with evaluation,
    export and checkpoint at their intervals and at the end; then the timeline, the summary
    and its console line (:mod:`colocate.runner.summary`).

    Args:
        prepared: The checked run (:func:`prepare`).
        announce: Print the summary's console line (a caller with its own passes False).
    """
    from tqdm import tqdm

    from colocate import Coordinator
    from colocate.operations.cluster import connect
    from colocate.operations.run_log import RunLog
    from colocate.operations.run_state import RunState, capture_rng, save_run
    from colocate.runner.build import loss_function
    from colocate.runner.data import PromptSampler
    from colocate.runner.evaluation import Evaluator
    from colocate.runner.rewards import RewardScorer
    from colocate.runner.steps import StepRunner
    from colocate.runner.summary import coordinator_facts, headline, summarize, write_summary

    started = time.time()
    cfg, libs, state = prepared.config, prepared.libs, prepared.state
    out = Path(cfg.out)
    connect(cfg.cluster.address, logical_gpus=prepared.gpus)
    args, options = libs.coordinator_args(loss_function(cfg))
    coord = Coordinator(*args, **options)
    seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed
    sampler = PromptSampler(len(prepared.train), seed, cfg.data.shuffle)
    task = state.task if state else {}
    if state:
        sampler.restore(task["sampler"])
    evaluator = None
    if prepared.eval is not None and (prepared.reward_names or libs.agent is not None):
        evaluator = Evaluator(
            cfg.eval,
            prepared.eval,
            cfg.rollout.max_tokens,
            prepared.decode,
            libs.agent,
            cfg.agent.reward_weight,
        )
    evals: list[dict] = list(task.get("evals", []))
    exports: list[str] = list(task.get("exports", []))
    export_root = (Path(cfg.export.dir) if cfg.export.dir else out / "export").resolve()
    log = RunLog(out, state.history if state else [], cfg.log.tensorboard, cfg.log.wandb_project)
    eval_log = open(out / "eval.jsonl", "w")  # noqa: SIM115 - closed below
    for row in evals:
        eval_log.write(json.dumps(row) + "\n")
    scorer = RewardScorer(cfg.reward, prepared.reward_names)
    first = state.next_step if state else 0

    def evaluate(done: int) -> dict:
        row = evaluator.evaluate(coord, scorer, done)
        evals.append(row)
        eval_log.write(json.dumps(row) + "\n")
        eval_log.flush()
        return row

    t_start = time.time()
    try:
        with coord:
            startup_s = time.time() - t_start  # Coordinator.start(): from call to ready
            scorer.start()
            if state:  # the engines get the resumed weights by a verified sync first
                coord.resume(state.trainer, state.weight_version)
                coord.rollouts.restore(task.get("rollouts"))
            runner = StepRunner(prepared, coord, scorer, sampler, task.get("group_rows"))
            setup_s = time.time() - started
            if evaluator and cfg.eval.at_start and first == 0:
                evaluate(0)
            bar = tqdm(range(first, cfg.steps), disable=not cfg.log.progress, desc="colocate-rl")
            for step in bar:
                done, last = step + 1, step + 1 == cfg.steps
                row = {"step": step, **runner.step(last)}
                row["data/epoch"] = float(sampler.epoch)
                if evaluator and evaluator.due(done, last):
                    row.update(evaluate(done))
                if (cfg.export.every and done % cfg.export.every == 0) or (
                    last and cfg.export.at_end
                ):
                    t0 = time.time()
                    exports.append(coord.export_hf(str(export_root / f"step-{done}")))
                    row["timing_s/export"] = time.time() - t0
                log.write(row)
                bar.set_postfix(_bar(row))
                every = cfg.checkpoint.save_every
                if every and (done % every == 0 or last):
                    snapshot = RunState(
                        done,
                        coord.weight_version,
                        capture_rng(),
                        list(log.rows),
                        {
                            "sampler": sampler.state(),
                            "rollouts": coord.rollouts.snapshot(),
                            "group_rows": runner.group_rows,
                            "evals": evals,
                            "exports": exports,
                        },
                    )
                    save_run(
                        out, snapshot, lambda d: {"trainer": coord.save_trainer(str(d / "trainer"))}
                    )
            runner.stop()
            facts = coordinator_facts(coord, out)
    finally:
        scorer.shutdown()
        eval_log.close()
        log.close()
    facts.update(startup_seconds=startup_s, setup_seconds=setup_s, eval=evals, exports=exports)
    facts.update(epochs_started=sampler.epoch + 1, total_seconds=time.time() - started)
    summary = summarize(prepared, log.rows, first, facts)
    write_summary(summary, log.rows, out)
    if announce:
        print(headline(summary, out))
    return summary
