"""The runner's recipe: typed, frozen sections, an OmegaConf structured config.

A recipe is a YAML file of these sections (every key optional but ``model.path`` and
``data.train``), with dotted overrides on the command line (``trainer.lr=1e-5``). OmegaConf
checks the key names and types; each section's ``__post_init__`` checks its values and
:class:`RunnerConfig` the combinations. Every refusal is a :class:`RecipeError` naming the key
path, the value and the fix (the command line exits 2 with it, before Ray starts).

Sections: ``model``, ``cluster``, ``data``, ``reward``, ``algorithm``, ``rollout``,
``trainer``, ``eval``, ``export``, ``log``, ``checkpoint``; top level: ``steps``, ``seed``,
``out``, ``skip_sync``. ``docs/runner.md`` describes each key.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from colocate.algorithms.advantages import Estimator
from colocate.algorithms.losses import LossAgg
from colocate.core.config import Pipeline, StalenessPolicy

__all__ = [
    "RecipeError",
    "OnError",
    "Estimator",
    "LossAgg",
    "ModelSection",
    "ClusterSection",
    "DataSection",
    "RewardSection",
    "AgentSection",
    "AlgorithmSection",
    "RolloutSection",
    "TrainerSection",
    "EvalSection",
    "ExportSection",
    "LogSection",
    "CheckpointSection",
    "RunnerConfig",
]

#: ``model.path`` value that builds the project's tiny Llama locally (demos and tests).
TINY_MODEL = "tiny"


class RecipeError(ValueError):
    """A recipe value that cannot work: ``key=value: problem; fix: fix``.

    Attributes:
        key: The dotted key path (``trainer.lr``).
        value: The offending value.
    """

    def __init__(self, key: str, value: object, problem: str, fix: str):
        super().__init__(f"{key}={value!r}: {problem}; fix: {fix}")
        self.key = key
        self.value = value


def _int(key: str, value: object, minimum: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise RecipeError(key, value, "must be an int", f"pass an int >= {minimum}")
    if value is not None and value < minimum:
        raise RecipeError(key, value, f"must be >= {minimum}", f"pass an int >= {minimum}")


def _num(key: str, value: object, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise RecipeError(
            key, value, f"must be a finite number in {bracket}{lo:g}, {hi:g}]", "pass one in it"
        )


class OnError(enum.Enum):
    """What a reward call that raised, timed out or gave a non-finite value does to the step.

    FAIL: the step fails, naming the row, the function and the reason (the trainer's state is
        untouched: nothing was trained on the batch).
    ZERO: that function scores 0 for the completion; counted in the metrics.
    DROP: the completion's whole prompt group leaves the batch; counted in the metrics.
    """

    FAIL = "fail"
    ZERO = "zero"
    DROP = "drop"


@dataclass(frozen=True)
class ModelSection:
    """The policy.

    Attributes:
        path: A local HF model directory (config.json, weights, tokenizer), or ``tiny``: the
            project's tiny Llama built locally (demos and tests; no download).
    """

    path: str = MISSING


@dataclass(frozen=True)
class ClusterSection:
    """GPUs and the Ray cluster.

    Attributes:
        address: A Ray cluster to join (default: ``RAY_ADDRESS``, as set by ``ray job submit``,
            else a local Ray).
        gpus: GPUs per node, shared by the trainer ranks and the engines (colocated).
        engines: vLLM engines (default: gpus / tp).
        tp: Tensor-parallel size of each engine.
        trainer_gpus: Separate pools: GPUs of the trainer (with ``engine_gpus``).
        engine_gpus: Separate pools: GPUs of the engines (with ``trainer_gpus``).
        sleep_level: vLLM sleep level of the engines while the trainer trains (1 or 2).
    """

    address: str | None = None
    gpus: int = 2
    engines: int | None = None
    tp: int = 1
    trainer_gpus: int | None = None
    engine_gpus: int | None = None
    sleep_level: int = 1

    def __post_init__(self) -> None:
        for name in ("gpus", "engines", "tp", "trainer_gpus", "engine_gpus"):
            _int(f"cluster.{name}", getattr(self, name))
        if self.sleep_level not in (1, 2):
            raise RecipeError("cluster.sleep_level", self.sleep_level, "must be 1 or 2", "pass 1")
        if (self.trainer_gpus is None) != (self.engine_gpus is None):
            raise RecipeError(
                "cluster.trainer_gpus",
                self.trainer_gpus,
                "goes with cluster.engine_gpus (separate pools)",
                "give both, or neither",
            )

    @property
    def separate(self) -> bool:
        """Trainer and engines on separate GPU pools."""
        return self.trainer_gpus is not None


@dataclass(frozen=True)
class DataSection:
    """The prompts (through HF ``datasets``).

    Attributes:
        train: A JSONL file, a Parquet file or a directory saved by ``Dataset.save_to_disk``.
        eval: The same for evaluation (default: ``eval_size`` rows held out of ``train``).
        eval_size: Rows held out of ``train`` for evaluation when ``eval`` is not given.
        prompt_key: The column holding each prompt: text, or chat messages
            (``[{"role": ..., "content": ...}]``).
        chat_template: Apply the tokenizer's chat template (with the generation prompt) where
            it has one.
        max_prompt_tokens: Longer prompts are filtered out and counted (default:
            ``rollout.max_model_len - rollout.max_tokens``).
        shuffle: Shuffle the rows each epoch (by ``seed`` and the epoch).
        seed: Seed of the shuffling (default: the run's ``seed``).
    """

    train: str = MISSING
    eval: str | None = None
    eval_size: int = 0
    prompt_key: str = "prompt"
    chat_template: bool = True
    max_prompt_tokens: int | None = None
    shuffle: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        _int("data.eval_size", self.eval_size, 0)
        _int("data.max_prompt_tokens", self.max_prompt_tokens)
        _int("data.seed", self.seed, 0)
        if not self.prompt_key:
            raise RecipeError("data.prompt_key", self.prompt_key, "is empty", "name a column")
        if self.eval is not None and self.eval_size:
            raise RecipeError(
                "data.eval_size",
                self.eval_size,
                "holds rows out of data.train, but data.eval is given",
                "drop one of the two",
            )


@dataclass(frozen=True)
class RewardSection:
    """Reward functions and/or a reward model; the reward is their weighted sum.

    Attributes:
        functions: ``"pkg.module:fn"`` or ``"path/to/file.py:fn"``; each is called as
            ``fn(prompt=str, completion=str, completion_ids=list[int], row=dict, **kwargs)`` and
            returns a float, or a dict with a ``"score"`` (the reward) and other named floats
            (logged). Built-ins: ``colocate.runner.reward_functions:math_answer``,
            ``:format_regex``, ``:overlong_penalty``.
        weights: One per function (default: 1 each).
        kwargs: Keyword arguments per function, by the function's name
            (``{format_regex: {pattern: "..."}}``).
        model: A local reward-model directory (the reward-model role scores each completion).
        model_weight: The reward model's weight in the sum.
        timeout_s: Most seconds one call of a function may take.
        workers: Reward workers (Ray actors) the calls are spread over.
        on_error: What a call that raised, timed out or gave a non-finite value does.
    """

    functions: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    model_weight: float = 1.0
    timeout_s: float = 30.0
    workers: int = 2
    on_error: OnError = OnError.FAIL

    def __post_init__(self) -> None:
        if self.weights and len(self.weights) != len(self.functions):
            raise RecipeError(
                "reward.weights",
                list(self.weights),
                f"{len(self.weights)} weights for {len(self.functions)} functions",
                "give one weight per function, or none (1 each)",
            )
        for i, w in enumerate(self.weights):
            _num(f"reward.weights[{i}]", w, -1e6, 1e6)
        _num("reward.model_weight", self.model_weight, -1e6, 1e6)
        _num("reward.timeout_s", self.timeout_s, 0.0, 86400.0, lo_open=True)
        _int("reward.workers", self.workers)
        for i, spec in enumerate(self.functions):
            if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
                raise RecipeError(
                    f"reward.functions[{i}]",
                    spec,
                    "is not MODULE:FUNCTION or FILE.py:FUNCTION",
                    'pass e.g. "my_rewards:score" or "rewards.py:score"',
                )


@dataclass(frozen=True)
class AgentSection:
    """Multi-turn episodes: each prompt's group plays ``agent.env`` instead of one completion.

    The environment (``colocate.agents.Environment``) gets the dataset row in ``reset`` and
    each model turn in ``step``; its observations are appended with loss mask 0 and its
    rewards are the episode's reward (weighted by ``reward_weight``, plus the reward
    functions' and the reward model's, if any). ``docs/agents.md`` has the details.

    Attributes:
        env: ``"pkg.module:Class"`` or ``"path/to/file.py:Class"``, the environment factory
            (None: single-turn rollouts).
        env_kwargs: Passed to the factory for every episode.
        max_turns: Model turns per episode.
        turn_tokens: Tokens per model turn (default ``rollout.max_tokens``).
        max_context: Tokens of a whole episode (default ``rollout.max_model_len``).
        step_timeout_s: Bound on one environment step (a tool call).
        step_workers: Threads running environment steps, per engine.
        observation: ``text`` or ``chat`` (the chat template's turn boundaries).
        reward_weight: The environment's reward's weight in the sum.
    """

    env: str | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 4
    turn_tokens: int | None = None
    max_context: int | None = None
    step_timeout_s: float = 30.0
    step_workers: int = 32
    observation: str = "text"
    reward_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.env is not None and (
            not isinstance(self.env, str) or not all(self.env.rpartition(":")[::2])
        ):
            raise RecipeError(
                "agent.env",
                self.env,
                "is not MODULE:CLASS or FILE.py:CLASS",
                'pass e.g. "my_envs:SearchEnv" or "envs.py:SearchEnv"',
            )
        for name in ("max_turns", "turn_tokens", "max_context", "step_workers"):
            _int(f"agent.{name}", getattr(self, name))
        _num("agent.step_timeout_s", self.step_timeout_s, 0.0, 86400.0, lo_open=True)
        _num("agent.reward_weight", self.reward_weight, -1e6, 1e6)
        if self.observation not in ("text", "chat"):
            raise RecipeError(
                "agent.observation", self.observation, "is not a format", "pass text or chat"
            )


@dataclass(frozen=True)
class AlgorithmSection:
    """Advantage estimator, policy loss and sampling filter.

    Attributes:
        estimator: ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp`` or ``gae`` (PPO, with the
            critic role).
        loss_agg: ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum`` or
            ``seq-mean-token-sum-norm`` (Dr. GRPO's: token sums over ``rollout.max_tokens``).
        clip_low: The ratio's lower clip range (1 - clip_low).
        clip_high: The upper clip range (1 + clip_high; default ``clip_low``; DAPO's
            clip-higher: 0.28).
        kl_coef: KL to the frozen reference (adds the reference role): a loss term for
            grpo, dr_grpo and rloo, a per-token reward penalty for reinforce_pp and gae.
        tis_cap: Truncated importance sampling: cap on pi_trainer / pi_engine per token.
        gamma: Discount (reinforce_pp, gae).
        lam: GAE's lambda.
        critic_lr: The critic's learning rate (gae).
        dynamic_sampling: DAPO: drop groups whose raw rewards are all equal and generate more
            until the batch is full.
        max_sampling_rounds: Most generate rounds per step with ``dynamic_sampling``.
        filter_metric: The raw score ``dynamic_sampling`` filters on: a reward function's
            name (e.g. ``math_answer``, so a shaping term such as the overlong penalty does
            not make a group look informative), ``env`` (an agent's environment's reward),
            or None for the total reward (verl's ``filter_groups.metric``).
    """

    estimator: Estimator = Estimator.GRPO
    loss_agg: LossAgg = LossAgg.TOKEN_MEAN
    clip_low: float = 0.2
    clip_high: float | None = None
    kl_coef: float = 0.0
    tis_cap: float | None = None
    gamma: float = 1.0
    lam: float = 0.95
    critic_lr: float = 1e-5
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    filter_metric: str | None = None

    def __post_init__(self) -> None:
        _num("algorithm.clip_low", self.clip_low, 0.0, 1.0, lo_open=True)
        _num("algorithm.clip_high", self.clip_high, 0.0, 10.0, lo_open=True)
        _num("algorithm.kl_coef", self.kl_coef, 0.0, 100.0)
        _num("algorithm.tis_cap", self.tis_cap, 1.0, 1e6)
        _num("algorithm.gamma", self.gamma, 0.0, 1.0)
        _num("algorithm.lam", self.lam, 0.0, 1.0)
        _num("algorithm.critic_lr", self.critic_lr, 0.0, 10.0, lo_open=True)
        _int("algorithm.max_sampling_rounds", self.max_sampling_rounds)

    @property
    def clip_upper(self) -> float:
        """The upper clip range (``clip_high``, else ``clip_low``)."""
        return self.clip_low if self.clip_high is None else self.clip_high


@dataclass(frozen=True)
class RolloutSection:
    """Sampling on the engines and the pipeline.

    Attributes:
        prompts: Prompts per step (groups per train batch).
        group_size: Completions per prompt.
        max_tokens: Most tokens per completion.
        max_model_len: The engines' context: prompt plus completion tokens.
        temperature: Sampling temperature.
        top_p: Nucleus sampling.
        pipeline: ``sync``, ``async`` (separate pools) or ``partial`` (groups in flight across
            the hand-over).
        in_flight_groups: partial: prompt groups kept in flight (default: twice ``prompts``).
        max_staleness: partial: most trainer steps between the weights of one completion's
            tokens.
        staleness_policy: partial: ``wait`` or ``drop``.
    """

    prompts: int = 16
    group_size: int = 8
    max_tokens: int = 128
    max_model_len: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    pipeline: Pipeline = Pipeline.SYNC
    in_flight_groups: int | None = None
    max_staleness: int = 2
    staleness_policy: StalenessPolicy = StalenessPolicy.WAIT

    def __post_init__(self) -> None:
        for name in ("prompts", "max_tokens", "in_flight_groups", "max_staleness"):
            _int(f"rollout.{name}", getattr(self, name))
        _int("rollout.group_size", self.group_size)
        _int("rollout.max_model_len", self.max_model_len, 16)
        _num("rollout.temperature", self.temperature, 0.0, 100.0)
        _num("rollout.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.max_tokens >= self.max_model_len:
            raise RecipeError(
                "rollout.max_tokens",
                self.max_tokens,
                f"leaves no room for a prompt in rollout.max_model_len={self.max_model_len}",
                "pass a smaller rollout.max_tokens or a larger rollout.max_model_len",
            )
        if self.in_flight_groups is not None and self.pipeline is not Pipeline.PARTIAL:
            raise RecipeError(
                "rollout.in_flight_groups",
                self.in_flight_groups,
                "goes with rollout.pipeline=partial",
                "drop it, or pass rollout.pipeline=partial",
            )


@dataclass(frozen=True)
class TrainerSection:
    """The DeepSpeed trainer.

    Attributes:
        lr: Learning rate (AdamW).
        zero_stage: DeepSpeed ZeRO stage (0-3).
        dtype: ``float32`` or ``bfloat16``.
        grad_clip: Gradient-norm clip (0: none).
        weight_decay: AdamW weight decay.
        micro_batch_size: Rows per forward/backward on each rank (padded rows).
        max_tokens_per_micro_batch: Packed sequences, at most this many tokens per
            forward/backward (in place of ``micro_batch_size``; at least
            ``rollout.max_model_len``).
        mini_batches: Optimizer steps per pass over a step's batch.
        epochs: Passes over a step's batch.
        activation_checkpointing: Recompute activations in the backward.
        sync_bucket_mb: Weight-sync bucket size (MiB; default: the library's).
    """

    lr: float = 1e-6
    zero_stage: int = 3
    dtype: str = "float32"
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    micro_batch_size: int | None = None
    max_tokens_per_micro_batch: int | None = None
    mini_batches: int = 1
    epochs: int = 1
    activation_checkpointing: bool = False
    sync_bucket_mb: float | None = None

    def __post_init__(self) -> None:
        _num("trainer.lr", self.lr, 0.0, 10.0, lo_open=True)
        if self.zero_stage not in (0, 1, 2, 3):
            raise RecipeError("trainer.zero_stage", self.zero_stage, "must be 0-3", "pass 3")
        if self.dtype not in ("float32", "bfloat16"):
            raise RecipeError(
                "trainer.dtype", self.dtype, "must be float32 or bfloat16", "pass one of them"
            )
        _num("trainer.grad_clip", self.grad_clip, 0.0, 1e6)
        _num("trainer.weight_decay", self.weight_decay, 0.0, 1.0)
        for name in ("micro_batch_size", "max_tokens_per_micro_batch", "mini_batches", "epochs"):
            _int(f"trainer.{name}", getattr(self, name))
        _num("trainer.sync_bucket_mb", self.sync_bucket_mb, 0.0, 65536.0, lo_open=True)
        if self.micro_batch_size is not None and self.max_tokens_per_micro_batch is not None:
            raise RecipeError(
                "trainer.micro_batch_size",
                self.micro_batch_size,
                "padded rows, but trainer.max_tokens_per_micro_batch asks for packed ones",
                "pass one of the two",
            )


@dataclass(frozen=True)
class EvalSection:
    """Evaluation through the same engines (the trainer stays offloaded).

    Attributes:
        every: Evaluate every this many steps (0: only at the end, with ``at_end``).
        at_end: Evaluate after the last step.
        at_start: Evaluate before the first step (the baseline of the run's rise).
        prompts: Eval prompts used (default: all of the eval split).
        k: Samples per prompt for pass@k and the sampled mean (besides one greedy sample).
        temperature: Temperature of the k samples.
        pass_threshold: A sample passes a reward function when its score is at least this.
    """

    every: int = 0
    at_end: bool = True
    at_start: bool = True
    prompts: int | None = None
    k: int = 4
    temperature: float = 1.0
    pass_threshold: float = 1.0

    def __post_init__(self) -> None:
        _int("eval.every", self.every, 0)
        _int("eval.prompts", self.prompts)
        _int("eval.k", self.k)
        _num("eval.temperature", self.temperature, 0.0, 100.0)
        _num("eval.pass_threshold", self.pass_threshold, -1e9, 1e9)


@dataclass(frozen=True)
class ExportSection:
    """HF directories of the trained policy (loadable by transformers and vLLM).

    Attributes:
        every: Export every this many steps (0: only at the end, with ``at_end``).
        at_end: Export after the last step.
        dir: Where (default: ``OUT/export``); each export goes to ``step-N`` under it.
    """

    every: int = 0
    at_end: bool = True
    dir: str | None = None

    def __post_init__(self) -> None:
        _int("export.every", self.every, 0)


@dataclass(frozen=True)
class LogSection:
    """Metrics sinks and the console.

    Attributes:
        tensorboard: TensorBoard event files under ``OUT/tensorboard``.
        wandb_project: Also log to W&B (offline mode) under this project.
        progress: A progress bar with the headline figures.
        vllm_log_level: vLLM's log level inside the engines.
    """

    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True
    vllm_log_level: str = "ERROR"


@dataclass(frozen=True)
class CheckpointSection:
    """Whole-run checkpoints.

    Attributes:
        save_every: Checkpoint the run every this many steps (and at the end).
        resume: Continue the run saved in this directory.
    """

    save_every: int | None = None
    resume: str | None = None

    def __post_init__(self) -> None:
        _int("checkpoint.save_every", self.save_every)


@dataclass(frozen=True)
class RunnerConfig:
    """A whole run (see the module docstring).

    Attributes:
        steps: Optimizer steps of the run (a resumed run included).
        seed: Seed of the data order, the sampling and the trainer.
        out: Output directory (metrics, exports, checkpoints).
        skip_sync: Negative control: never send the trained weights to the engines.
    """

    model: ModelSection = field(default_factory=ModelSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    data: DataSection = field(default_factory=DataSection)
    reward: RewardSection = field(default_factory=RewardSection)
    agent: AgentSection = field(default_factory=AgentSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    export: ExportSection = field(default_factory=ExportSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    steps: int = 30
    seed: int = 0
    out: str = "runs/colocate-rl"
    skip_sync: bool = False

    def __post_init__(self) -> None:
        _int("steps", self.steps)
        _int("seed", self.seed, 0)
        self._check_combinations()

    def _check_combinations(self) -> None:
        alg, rollout, cluster = self.algorithm, self.rollout, self.cluster
        agent = self.agent.env is not None
        if not self.reward.functions and self.reward.model is None and not agent:
            raise RecipeError(
                "reward.functions",
                list(self.reward.functions),
                "no reward: neither functions, a model, nor an environment (agent.env)",
                'pass reward.functions=["pkg.module:fn"], reward.model=PATH or agent.env',
            )
        if agent:
            self._check_agent()
        grouped = alg.estimator in (Estimator.GRPO, Estimator.DR_GRPO, Estimator.RLOO)
        if grouped and rollout.group_size < 2:
            raise RecipeError(
                "rollout.group_size",
                rollout.group_size,
                f"{alg.estimator.value} compares completions of one prompt: with one, every "
                "advantage is 0",
                "pass rollout.group_size=2 or more",
            )
        if rollout.pipeline is Pipeline.ASYNC and not cluster.separate:
            raise RecipeError(
                "rollout.pipeline",
                rollout.pipeline.value,
                "async overlaps rollouts with training on different GPUs",
                "add cluster.trainer_gpus=N cluster.engine_gpus=M, or pass rollout.pipeline=sync",
            )
        needs_loop = alg.kl_coef > 0 or alg.estimator is Estimator.GAE or self.reward.model
        if needs_loop and rollout.pipeline is Pipeline.ASYNC:
            raise RecipeError(
                "rollout.pipeline",
                rollout.pipeline.value,
                "the reference, reward-model and critic roles are ordered by the sync loop",
                "pass rollout.pipeline=sync (or partial)",
            )
        if alg.dynamic_sampling and rollout.pipeline is not Pipeline.SYNC:
            raise RecipeError(
                "algorithm.dynamic_sampling",
                alg.dynamic_sampling,
                f"generates extra rounds within a step; rollout.pipeline={rollout.pipeline.value}"
                " generates ahead",
                "pass rollout.pipeline=sync, or drop dynamic sampling",
            )
        if alg.dynamic_sampling and self.reward.model is not None:
            raise RecipeError(
                "algorithm.dynamic_sampling",
                alg.dynamic_sampling,
                "filters each round on the reward functions' raw scores; a reward model only "
                "scores after the rollout (the SCORE hand-over)",
                "drop reward.model, or dynamic sampling",
            )
        budget = self.trainer.max_tokens_per_micro_batch
        if budget is not None and budget < rollout.max_model_len:
            raise RecipeError(
                "trainer.max_tokens_per_micro_batch",
                budget,
                f"below rollout.max_model_len={rollout.max_model_len}: a sequence of the "
                "engines' longest length would not fit in a micro-batch",
                f"pass {rollout.max_model_len} or more",
            )
        if self.skip_sync and cluster.sleep_level == 2 and not cluster.separate:
            raise RecipeError(
                "skip_sync",
                True,
                "cluster.sleep_level=2 drops the engines' weights, which only a sync restores",
                "drop one of the two",
            )

    def _check_agent(self) -> None:
        """What multi-turn episodes do not run with (yet), refused on its key."""
        if self.rollout.pipeline is Pipeline.ASYNC:
            raise RecipeError(
                "rollout.pipeline",
                self.rollout.pipeline.value,
                "agent episodes run in the colocated loop (sync or partial)",
                "pass rollout.pipeline=sync (or partial)",
            )
