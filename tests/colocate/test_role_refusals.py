"""Bad roles are refused when the Coordinator is built: before any actor or Ray call.

Each error names the field, the value and the fix.
"""

import json

import pytest

from colocate import (
    ConfigError,
    Coordinator,
    EngineConfig,
    Phase,
    Role,
    TinyModelSpec,
    TrainerConfig,
    build_tiny_model,
    grpo_loss,
    init_reward_model,
    reference_role,
    reward_model_role,
)
from placement import TopologyError, TopologySpec

pytestmark = pytest.mark.fast

SPEC = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)


def _coordinator(model, roles):
    return Coordinator(
        SPEC, EngineConfig(model=model), TrainerConfig(model=model), grpo_loss, roles=roles
    )


def test_a_reward_model_needs_a_single_score_head(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="ForSequenceClassification.*fix: save a sequence"):
        _coordinator(tiny_model_dir, [reward_model_role(tiny_model_dir)])  # a causal LM
    two = init_reward_model(tiny_model_dir, tmp_path / "two")
    config = json.loads((two / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="the head has 2 outputs.*fix: num_labels=1"):
        _coordinator(tiny_model_dir, [reward_model_role(str(two))])


def test_a_role_with_another_vocabulary_is_refused(tiny_model_dir):
    other = str(build_tiny_model(TinyModelSpec(vocab_size=600)))
    with pytest.raises(ConfigError, match="ReferenceConfig.model=.*vocab_size .* differs"):
        _coordinator(tiny_model_dir, [reference_role(other)])
    with pytest.raises(ConfigError, match="RewardModelConfig.model=.*no config.json"):
        _coordinator(tiny_model_dir, [reward_model_role("/nonexistent/rm")])


def test_role_placement_is_checked_by_the_planner(tiny_model_dir):
    with pytest.raises(TopologyError, match=r"bundles=\(0, 7\): bundle 7 does not exist"):
        _coordinator(tiny_model_dir, [reference_role(tiny_model_dir, bundles=(0, 7))])
    roles = [
        reference_role(tiny_model_dir, gpu_fraction=0.5),
        reward_model_role(str(tiny_model_dir), gpu_fraction=0.5),
    ]
    with pytest.raises((TopologyError, ConfigError), match="fix:") as err:
        _coordinator(tiny_model_dir, roles)
    assert "no share" in str(err.value) or "> 1" in str(err.value)


def test_role_fields_are_typed():
    with pytest.raises(ConfigError, match="must subclass colocate.core.contract.RoleTenant"):
        Role("judge", dict)
    from colocate.roles.reference import ReferenceActor

    with pytest.raises(ConfigError, match="phases=.*fix:"):
        Role("judge", ReferenceActor, phases=frozenset({Phase.BOOT}))
    with pytest.raises(ConfigError, match="reserved"):
        Role("trainer", ReferenceActor)
