"""The recipe loader (colocate.runner.recipe) and the library configs it builds (.build).

Pure: no Ray, no model is loaded (the library configs take any model path; nothing reads it).
"""

from __future__ import annotations

import json

import pytest

from colocate.algorithms.advantages import Estimator
from colocate.algorithms.losses import LossAgg
from colocate.core.config import DType, Pipeline, StalenessPolicy, ZeroStage
from colocate.runner.build import library_configs, resolve_model
from colocate.runner.recipe import MissingValueError, load_recipe, to_yaml
from colocate.runner.schema import ModelSection, OnError, RecipeError, RunnerConfig
from placement import TopologyError

pytestmark = pytest.mark.fast

MINIMAL = """\
model:
  path: /models/policy
data:
  train: prompts.jsonl
reward:
  functions: ["colocate.runner.reward_functions:math_answer"]
"""
POLICY = "/models/policy"


@pytest.fixture
def recipe(tmp_path):
    """A minimal recipe file; ``recipe(text)`` writes another."""

    def write(text: str = MINIMAL, name: str = "recipe.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def refusal(path: str | None, *overrides: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value


# ----- loading --------------------------------------------------------------------------------


def test_a_minimal_recipe_takes_every_default(recipe):
    config = load_recipe(recipe(), [])
    assert isinstance(config, RunnerConfig)
    assert config.model.path == POLICY
    assert config.data.train == "prompts.jsonl"
    assert config.reward.functions == ["colocate.runner.reward_functions:math_answer"]
    assert config.algorithm.estimator is Estimator.GRPO
    assert config.algorithm.loss_agg is LossAgg.TOKEN_MEAN
    assert config.rollout.pipeline is Pipeline.SYNC
    assert config.steps == RunnerConfig.steps


def test_overrides_win_over_the_file_in_order(recipe):
    config = load_recipe(
        recipe(),
        [
            "trainer.lr=1e-5",
            "rollout.group_size=4",
            "rollout.group_size=6",  # the later one wins
            "algorithm.estimator=dr_grpo",
            "algorithm.loss_agg=seq-mean-token-sum-norm",
            "reward.on_error=drop",
            "reward.kwargs.math_answer.strict=true",
            "data.train=other.jsonl",
        ],
    )
    assert config.trainer.lr == 1e-5
    assert config.rollout.group_size == 6
    assert config.algorithm.estimator is Estimator.DR_GRPO
    assert config.algorithm.loss_agg is LossAgg.SEQ_MEAN_TOKEN_SUM_NORM
    assert config.reward.on_error is OnError.DROP
    assert config.reward.kwargs == {"math_answer": {"strict": True}}
    assert config.data.train == "other.jsonl"


def test_overrides_alone_make_a_recipe():
    config = load_recipe(None, ["model.path=tiny", "data.train=p.jsonl", "reward.model=/models/rm"])
    assert config.reward.model == "/models/rm" and config.reward.functions == []


def test_enum_names_are_taken_too(recipe):
    config = load_recipe(recipe(), ["algorithm.estimator=RLOO", "rollout.pipeline=PARTIAL"])
    assert config.algorithm.estimator is Estimator.RLOO
    assert config.rollout.pipeline is Pipeline.PARTIAL


def test_an_empty_section_keeps_its_defaults(recipe):
    config = load_recipe(recipe(MINIMAL + "trainer:\n"), [])
    assert config.trainer == load_recipe(recipe(), []).trainer


def test_interpolations_resolve(recipe):
    config = load_recipe(recipe(), ["algorithm.clip_high=${algorithm.clip_low}"])
    assert config.algorithm.clip_high == config.algorithm.clip_low


def test_an_interpolation_that_does_not_resolve_is_refused(recipe):
    err = refusal(recipe(), "algorithm.clip_high=${algorithm.nope}")
    assert err.key == "algorithm.clip_high" and "cannot be resolved" in str(err)


# ----- refusals: the file and the overrides -----------------------------------------------------


def test_a_missing_file_is_refused_on_config(tmp_path):
    err = refusal(str(tmp_path / "nope.yaml"))
    assert err.key == "--config" and "no such file" in str(err)


def test_a_directory_is_not_a_recipe(tmp_path):
    assert refusal(str(tmp_path)).key == "--config"


def test_invalid_yaml_is_refused_with_its_line(recipe):
    err = refusal(recipe("model:\n  path: [x\n"))
    assert err.key == "--config"
    assert "is not valid YAML" in str(err) and "line" in str(err)


@pytest.mark.parametrize("text", ["- a\n- b\n", "3\n"])
def test_a_recipe_that_is_not_a_mapping_is_refused(recipe, text):
    err = refusal(recipe(text))
    assert err.key == "--config" and "fix: write a mapping of sections" in str(err)


@pytest.mark.parametrize("item", ["trainer.lr", "=3"])
def test_an_override_without_a_key_and_value_is_refused(recipe, item):
    err = refusal(recipe(), item)
    assert err.key == "override" and "is not KEY=VALUE" in str(err)


# ----- refusals: keys -------------------------------------------------------------------------


def test_an_unknown_top_level_key_names_its_path_and_the_closest(recipe):
    err = refusal(recipe(), "trainr.lr=1e-5")
    assert err.key == "trainr.lr"
    assert "the recipe has no key 'trainr'" in str(err)
    assert "fix: did you mean trainer.lr?" in str(err)


def test_an_unknown_nested_key_lists_its_sections_keys(recipe):
    err = refusal(recipe(), "trainer.lrr=1e-5")
    assert err.key == "trainer.lrr"
    assert "trainer has no key 'lrr' (its keys: lr, zero_stage," in str(err)
    assert "did you mean trainer.lr?" in str(err)


def test_an_unknown_key_without_a_close_one(recipe):
    err = refusal(recipe(), "rollout.colour=blue")
    assert err.key == "rollout.colour"
    assert "fix: use one of its keys, or drop it" in str(err)


def test_an_unknown_key_in_the_file_names_its_full_path(recipe):
    err = refusal(recipe(MINIMAL + "algorithm:\n  estimater: gae\n"))
    assert err.key == "algorithm.estimater"
    assert "did you mean algorithm.estimator?" in str(err)


def test_reward_kwargs_take_any_keys(recipe):
    config = load_recipe(recipe(), ["reward.kwargs.format_regex.pattern=x"])
    assert config.reward.kwargs == {"format_regex": {"pattern": "x"}}


def test_a_section_given_a_value_is_refused(recipe):
    err = refusal(recipe(), "model=3")
    assert err.key == "model" and "is a section" in str(err) and "model.path=" in str(err)


def test_a_value_given_a_section_is_refused(recipe):
    err = refusal(recipe(), "steps.foo=1")
    assert err.key == "steps.foo" and "steps is a value (an int), not a section" in str(err)


# ----- refusals: types and enum values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("trainer.lr=abc", "trainer.lr", "must be a number"),
        ("rollout.prompts=1.5", "rollout.prompts", "must be an int"),
        ("steps=true", "steps", "must be an int"),
        ("steps=null", "steps", "must be an int"),
        ("reward.functions=3", "reward.functions", "must be a list of strings"),
        ("reward.weights=[a]", "reward.weights[0]", "must be a number"),
        ("model.path=[1,2]", "model.path", "must be a string"),
        ("trainer.activation_checkpointing=3", "trainer.activation_checkpointing", "true or"),
    ],
)
def test_a_value_of_the_wrong_type_names_key_value_and_type(recipe, override, key, expected):
    err = refusal(recipe(), override)
    assert err.key == key
    assert expected in str(err) and "; fix: pass " in str(err)


def test_a_wrong_type_fix_shows_the_default(recipe):
    assert "fix: pass an int, e.g. rollout.prompts=16" in str(
        refusal(recipe(), "rollout.prompts=x")
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algorithm.estimator=ppo", "algorithm.estimator"),
        ("algorithm.loss_agg=mean", "algorithm.loss_agg"),
        ("rollout.pipeline=fast", "rollout.pipeline"),
        ("rollout.staleness_policy=never", "rollout.staleness_policy"),
        ("reward.on_error=ignore", "reward.on_error"),
    ],
)
def test_an_enum_value_not_allowed_lists_the_values(recipe, override, key):
    err = refusal(recipe(), override)
    assert err.key == key and "is not one of" in str(err)


def test_the_enum_refusal_lists_values_not_names(recipe):
    text = str(refusal(recipe(), "algorithm.loss_agg=mean"))
    assert "token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm" in text


# ----- refusals: missing values -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "key", "fix"),
    [
        ("model", "model.path", "fix: pass model.path=DIR"),
        ("data", "data.train", "fix: pass data.train=FILE"),
    ],
)
def test_a_missing_required_value_says_how_to_give_it(recipe, drop, key, fix):
    sections = {
        "model": "model:\n  path: /models/policy\n",
        "data": "data:\n  train: prompts.jsonl\n",
        "reward": "reward:\n  functions: [m:f]\n",
    }
    text = "".join(v for k, v in sections.items() if k != drop)
    err = refusal(recipe(text))
    assert isinstance(err, MissingValueError)
    assert err.key == key
    assert str(err).startswith(f"{key} is required") and fix in str(err)


def test_every_missing_value_is_named():
    err = refusal(None)
    assert err.key == "model.path"
    assert "also missing: data.train" in str(err)


def test_a_recipe_without_any_reward_is_refused(recipe):
    err = refusal(recipe("model:\n  path: /models/policy\ndata:\n  train: prompts.jsonl\n"))
    assert isinstance(err, RecipeError) and err.key == "reward.functions"
    assert "neither functions, a model, nor an environment (agent.env)" in str(err)
    assert "fix: pass reward.functions=" in str(err)


# ----- refusals: the sections' values and their combinations ---------------------------------

SECTION_VALUES = [
    ("cluster.gpus=0", "cluster.gpus"),
    ("cluster.engines=0", "cluster.engines"),
    ("cluster.tp=0", "cluster.tp"),
    ("cluster.sleep_level=3", "cluster.sleep_level"),
    ("cluster.trainer_gpus=1", "cluster.trainer_gpus"),
    ("data.eval_size=-1", "data.eval_size"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"),
    ("data.seed=-1", "data.seed"),
    ("data.prompt_key=''", "data.prompt_key"),
    ("reward.weights=[1,2]", "reward.weights"),
    ("reward.weights=[1e9]", "reward.weights[0]"),
    ("reward.model_weight=1e9", "reward.model_weight"),
    ("reward.timeout_s=0", "reward.timeout_s"),
    ("reward.workers=0", "reward.workers"),
    ("reward.functions=[no_colon]", "reward.functions[0]"),
    ("reward.functions=[]", "reward.functions"),
    ("agent.env=no_colon", "agent.env"),
    ("agent.max_turns=0", "agent.max_turns"),
    ("agent.turn_tokens=0", "agent.turn_tokens"),
    ("agent.max_context=0", "agent.max_context"),
    ("agent.step_timeout_s=0", "agent.step_timeout_s"),
    ("agent.step_workers=0", "agent.step_workers"),
    ("agent.observation=html", "agent.observation"),
    ("agent.reward_weight=1e9", "agent.reward_weight"),
    ("algorithm.clip_low=0", "algorithm.clip_low"),
    ("algorithm.clip_high=0", "algorithm.clip_high"),
    ("algorithm.kl_coef=-1", "algorithm.kl_coef"),
    ("algorithm.tis_cap=0.5", "algorithm.tis_cap"),
    ("algorithm.gamma=2", "algorithm.gamma"),
    ("algorithm.lam=-0.1", "algorithm.lam"),
    ("algorithm.critic_lr=0", "algorithm.critic_lr"),
    ("algorithm.max_sampling_rounds=0", "algorithm.max_sampling_rounds"),
    ("rollout.prompts=0", "rollout.prompts"),
    ("rollout.group_size=0", "rollout.group_size"),
    ("rollout.max_tokens=0", "rollout.max_tokens"),
    ("rollout.max_model_len=8", "rollout.max_model_len"),
    ("rollout.max_tokens=1024", "rollout.max_tokens"),
    ("rollout.max_staleness=0", "rollout.max_staleness"),
    ("rollout.temperature=-1", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.in_flight_groups=40", "rollout.in_flight_groups"),
    ("trainer.lr=0", "trainer.lr"),
    ("trainer.zero_stage=4", "trainer.zero_stage"),
    ("trainer.dtype=float16", "trainer.dtype"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"),
    ("trainer.weight_decay=2", "trainer.weight_decay"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("trainer.max_tokens_per_micro_batch=0", "trainer.max_tokens_per_micro_batch"),
    ("trainer.mini_batches=0", "trainer.mini_batches"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.sync_bucket_mb=0", "trainer.sync_bucket_mb"),
    ("eval.every=-1", "eval.every"),
    ("eval.prompts=0", "eval.prompts"),
    ("eval.k=0", "eval.k"),
    ("eval.temperature=-1", "eval.temperature"),
    ("eval.pass_threshold=1e10", "eval.pass_threshold"),
    ("export.every=-1", "export.every"),
    ("checkpoint.save_every=0", "checkpoint.save_every"),
    ("steps=0", "steps"),
    ("seed=-1", "seed"),
]


@pytest.mark.parametrize(("override", "key"), SECTION_VALUES)
def test_each_sections_values_are_checked(recipe, override, key):
    err = refusal(recipe(), override)
    assert err.key == key
    assert str(err).startswith(f"{key}=") and "; fix: " in str(err)


COMBINATIONS = [
    (["data.eval=e.jsonl", "data.eval_size=3"], "data.eval_size"),
    (["rollout.group_size=1"], "rollout.group_size"),
    (["algorithm.estimator=rloo", "rollout.group_size=1"], "rollout.group_size"),
    (["rollout.pipeline=async"], "rollout.pipeline"),
    (
        [
            "rollout.pipeline=async",
            "cluster.trainer_gpus=1",
            "cluster.engine_gpus=1",
            "algorithm.kl_coef=0.1",
        ],
        "rollout.pipeline",
    ),
    (
        [
            "rollout.pipeline=async",
            "cluster.trainer_gpus=1",
            "cluster.engine_gpus=1",
            "algorithm.estimator=gae",
        ],
        "rollout.pipeline",
    ),
    (["algorithm.dynamic_sampling=true", "rollout.pipeline=partial"], "algorithm.dynamic_sampling"),
    (["trainer.micro_batch_size=2", "trainer.max_tokens_per_micro_batch=2048"], "trainer."),
    (["trainer.max_tokens_per_micro_batch=512"], "trainer.max_tokens_per_micro_batch"),
    (["skip_sync=true", "cluster.sleep_level=2"], "skip_sync"),
    (
        [
            "agent.env=m:Env",
            "rollout.pipeline=async",
            "cluster.trainer_gpus=1",
            "cluster.engine_gpus=1",
        ],
        "rollout.pipeline",
    ),
]


def test_an_agent_recipe_needs_no_reward_function(recipe):
    text = "model:\n  path: /models/policy\ndata:\n  train: p.jsonl\nagent:\n  env: m:Env\n"
    config = load_recipe(recipe(text), [])
    assert config.agent.env == "m:Env" and config.reward.functions == []


def test_an_environment_that_does_not_import_is_refused_on_its_key(recipe, tmp_path):
    config = load_recipe(recipe(), ["agent.env=no_such_module:Env"])
    with pytest.raises(RecipeError) as info:
        library_configs(config, str(tmp_path))
    assert info.value.key == "agent.env" and "no_such_module" in str(info.value)
    assert "; fix: " in str(info.value)


@pytest.mark.parametrize(("overrides", "key"), COMBINATIONS)
def test_each_combination_that_cannot_work_is_refused(recipe, overrides, key):
    err = refusal(recipe(), *overrides)
    assert err.key.startswith(key)
    assert "; fix: " in str(err)


def test_combinations_that_work_load(recipe):
    load_recipe(recipe(), ["algorithm.estimator=reinforce_pp", "rollout.group_size=1"])
    load_recipe(
        recipe(),
        ["rollout.pipeline=async", "cluster.trainer_gpus=1", "cluster.engine_gpus=1"],
    )
    load_recipe(recipe(), ["skip_sync=true", "cluster.sleep_level=2", *_SEPARATE])


_SEPARATE = ["cluster.trainer_gpus=1", "cluster.engine_gpus=3"]


# ----- to_yaml --------------------------------------------------------------------------------


def test_to_yaml_prints_enums_by_value_and_round_trips(recipe, tmp_path):
    config = load_recipe(
        recipe(),
        [
            "algorithm.estimator=gae",
            "algorithm.loss_agg=seq-mean-token-sum-norm",
            "algorithm.clip_high=0.28",
            "rollout.pipeline=partial",
            "rollout.in_flight_groups=40",
            "rollout.staleness_policy=drop",
            "reward.on_error=zero",
            "reward.functions=[a:b,c.py:d]",
            "reward.weights=[1.0,0.5]",
            "reward.kwargs.b.pattern='^x$'",
            "reward.kwargs.b.flags=[1,2]",
            "trainer.lr=3e-6",
            "trainer.dtype=bfloat16",
            "data.train=y",
            "out=123",
        ],
    )
    text = to_yaml(config)
    for line in (
        "estimator: gae",
        "loss_agg: seq-mean-token-sum-norm",
        "pipeline: partial",
        "staleness_policy: drop",
        "on_error: zero",
    ):
        assert line in text
    again = tmp_path / "printed.yaml"
    again.write_text(text)
    assert load_recipe(str(again), []) == config


def test_to_yaml_of_the_minimal_recipe_round_trips(recipe, tmp_path):
    config = load_recipe(recipe(), [])
    (tmp_path / "again.yaml").write_text(to_yaml(config))
    assert load_recipe(str(tmp_path / "again.yaml"), []) == config
    assert "loss_agg: token-mean" in to_yaml(config)


# ----- the model ------------------------------------------------------------------------------


def test_resolve_model_refuses_what_is_not_a_model_dir(tmp_path):
    with pytest.raises(RecipeError) as info:
        resolve_model(ModelSection(str(tmp_path / "absent")))
    assert info.value.key == "model.path" and "does not exist" in str(info.value)
    with pytest.raises(RecipeError) as info:
        resolve_model(ModelSection(str(tmp_path)))
    assert info.value.key == "model.path" and "holds no config.json" in str(info.value)


def test_resolve_model_gives_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({}))
    monkeypatch.chdir(tmp_path)
    assert resolve_model(ModelSection("m")) == str(tmp_path / "m")


# ----- the library configs ----------------------------------------------------------------------


def configs_of(recipe, *overrides):
    return library_configs(load_recipe(recipe(), list(overrides)), POLICY)


def test_a_sync_recipes_library_configs(recipe):
    c = configs_of(
        recipe,
        "cluster.gpus=4",
        "cluster.tp=2",
        "seed=7",
        "trainer.lr=2e-6",
        "trainer.zero_stage=2",
        "trainer.dtype=bfloat16",
        "trainer.grad_clip=0.5",
        "trainer.weight_decay=0.01",
        "trainer.micro_batch_size=4",
        "trainer.mini_batches=2",
        "trainer.epochs=3",
        "trainer.activation_checkpointing=true",
        "trainer.sync_bucket_mb=4",
        "rollout.group_size=4",
        "rollout.max_tokens=64",
        "rollout.max_model_len=512",
        "rollout.temperature=0.7",
        "rollout.top_p=0.9",
        "log.vllm_log_level=WARNING",
        "cluster.sleep_level=2",
    )
    assert c.model == POLICY
    s = c.spec
    assert (s.nodes, s.gpus_per_node, s.trainer_world_size, s.engines, s.engine_tp) == (
        1,
        4,
        4,
        2,
        2,
    )
    assert s.colocate and s.roles == ()
    e = c.engine
    assert (e.model, e.tensor_parallel_size, e.seed, e.log_level, e.max_model_len) == (
        POLICY,
        2,
        7,
        "WARNING",
        512,
    )
    t = c.trainer
    assert t.model == POLICY and t.lr == 2e-6 and t.zero_stage is ZeroStage.ZERO2
    assert t.dtype is DType.BFLOAT16 and t.grad_clip == 0.5 and t.weight_decay == 0.01
    assert t.seed == 7 and t.micro_batch_size == 4 and t.max_tokens_per_micro_batch is None
    assert t.mini_batches == 2 and t.epochs == 3 and t.activation_checkpointing
    assert t.loss_tokens == "completion_mask"
    assert c.sync.bucket_bytes == 4 << 20
    assert c.pipeline.mode is Pipeline.SYNC and c.pipeline.in_flight_groups is None
    sm = c.sampling
    assert (sm.n, sm.max_tokens, sm.temperature, sm.top_p) == (4, 64, 0.7, 0.9)
    assert c.sleep_level == 2
    assert c.roles == []


def test_defaults_leave_the_sync_bucket_and_engines_to_the_library(recipe):
    c = configs_of(recipe)
    assert c.sync.bucket_bytes is None
    assert c.spec.engines == c.spec.gpus_per_node == 2


def test_a_partial_recipes_pipeline(recipe):
    c = configs_of(recipe, "rollout.pipeline=partial", "rollout.prompts=8")
    assert c.pipeline.mode is Pipeline.PARTIAL
    assert c.pipeline.in_flight_groups == 16  # twice the prompts
    assert c.pipeline.max_staleness == 2
    c = configs_of(
        recipe,
        "rollout.pipeline=partial",
        "rollout.in_flight_groups=40",
        "rollout.max_staleness=3",
        "rollout.staleness_policy=drop",
    )
    assert c.pipeline.in_flight_groups == 40 and c.pipeline.max_staleness == 3
    assert c.pipeline.staleness_policy is StalenessPolicy.DROP
    assert c.spec.colocate


def test_a_separate_pools_async_recipe(recipe):
    c = configs_of(recipe, "rollout.pipeline=async", *_SEPARATE, "rollout.max_staleness=5")
    s = c.spec
    assert not s.colocate
    assert (s.gpus_per_node, s.trainer_world_size, s.engines, s.engine_tp) == (4, 1, 3, 1)
    assert c.pipeline.mode is Pipeline.ASYNC
    assert c.pipeline.max_staleness == 1  # one step behind, whatever rollout.max_staleness
    assert c.roles == []


def test_a_ppo_recipes_roles(recipe):
    c = configs_of(
        recipe,
        "algorithm.estimator=gae",
        "algorithm.kl_coef=0.05",
        "algorithm.critic_lr=2e-5",
        "algorithm.loss_agg=seq-mean-token-mean",
        "reward.model=/models/rm",
        "trainer.max_tokens_per_micro_batch=2048",
        "trainer.zero_stage=1",
        "seed=3",
    )
    assert [r.name for r in c.roles] == ["reference", "reward", "critic"]
    ref, rm, critic = c.roles
    assert ref.config.model == POLICY and ref.config.max_tokens_per_micro_batch == 2048
    assert rm.config.model == "/models/rm" and rm.config.max_tokens_per_micro_batch == 2048
    ct = critic.config.trainer
    assert ct.model == POLICY and ct.lr == 2e-5 and ct.zero_stage is ZeroStage.ZERO1
    assert ct.seed == 3 and ct.max_tokens_per_micro_batch == 2048
    assert ct.loss_tokens == "completion_mask"  # the value loss's mask
    # seq-mean aggregation: micro-batches weighed by the sequences they hold
    assert c.trainer.loss_tokens == "sequence_starts"


@pytest.mark.parametrize(
    ("overrides", "roles"),
    [
        (["algorithm.kl_coef=0.1"], ["reference"]),
        (["reward.model=/models/rm"], ["reward"]),
        (["algorithm.estimator=gae"], ["critic"]),
        (["algorithm.estimator=reinforce_pp", "algorithm.kl_coef=0.1"], ["reference"]),
    ],
)
def test_each_role_comes_from_its_key(recipe, overrides, roles):
    assert [r.name for r in configs_of(recipe, *overrides).roles] == roles


@pytest.mark.parametrize(
    "agg", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_sequence_mean_losses_weigh_by_sequence_starts(recipe, agg):
    assert configs_of(recipe, f"algorithm.loss_agg={agg}").trainer.loss_tokens == (
        "sequence_starts"
    )


@pytest.mark.parametrize(
    ("overrides", "key", "fix"),
    [
        (["cluster.engines=3"], "cluster.engines", "fix: set cluster.engines=2 for cluster.tp=1"),
        (["cluster.tp=3"], "cluster.tp", "fix: use cluster.tp <= 2"),
        (["cluster.gpus=3", "cluster.tp=2"], "cluster.tp", "fix: use a divisor of 3"),
        (["log.vllm_log_level=LOUD"], "log.vllm_log_level", "fix: use DEBUG, INFO"),
    ],
)
def test_a_library_refusal_names_the_recipe_key(recipe, overrides, key, fix):
    config = load_recipe(recipe(), overrides)  # the schema lets these through
    with pytest.raises(RecipeError) as info:
        library_configs(config, POLICY)
    err = info.value
    assert err.key == key
    assert str(err).startswith(f"{key}=") and fix in str(err)
    assert isinstance(err.__cause__, (TopologyError, ValueError))


def test_a_topology_error_is_the_cause(recipe):
    with pytest.raises(RecipeError) as info:
        configs_of(recipe, "cluster.engines=3")
    assert isinstance(info.value.__cause__, TopologyError)
    assert info.value.value == 3


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ([*_SEPARATE, "cluster.engines=2"], "cluster.engines"),
        (["cluster.trainer_gpus=1", "cluster.engine_gpus=3", "cluster.tp=2"], "cluster.tp"),
    ],
)
def test_an_engine_pool_the_engines_do_not_fill_is_refused(recipe, overrides, key):
    with pytest.raises(RecipeError) as info:
        configs_of(recipe, *overrides)
    assert info.value.key == key and "cluster.engine_gpus=3" in str(info.value)
