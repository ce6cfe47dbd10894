"""The reference policy and the reward model are one frozen-model role, and a user's is a third.

In-process, no Ray: the actor classes are instantiated directly on the CPU.
"""

import pytest
import torch

from colocate import (
    ConfigError,
    FrozenModelActor,
    FrozenModelConfig,
    ReferenceActor,
    ReferenceConfig,
    RewardModelActor,
    RewardModelConfig,
    RoleKind,
)
from colocate.core.contract import Seat, verbs_of
from colocate.core.errors import ActorStateError
from colocate.operations.memory_plan import ModelHead, model_shape
from colocate.roles.critic import batch_values, token_values

pytestmark = pytest.mark.fast


class FrozenValues(FrozenModelActor):
    """A user's frozen role: a value model, one score per token."""

    auto_class = "AutoModelForTokenClassification"
    head = ModelHead.TOKEN_SCORE
    outputs = 1
    forward_fn = staticmethod(batch_values)
    span_name = "values.values"

    def values(self, batch: dict) -> torch.Tensor:
        return self.forward_batch(batch)


def test_the_built_in_frozen_roles_share_one_implementation():
    shared = {"check_config", "footprint", "build", "join", "forward_batch", "__init__"}
    for actor, config, verb in [
        (ReferenceActor, ReferenceConfig, "logprobs"),
        (RewardModelActor, RewardModelConfig, "scores"),
    ]:
        assert actor.__bases__ == (FrozenModelActor,)
        assert shared.isdisjoint(vars(actor)), actor
        assert config.__bases__ == (FrozenModelConfig,)
        assert "__post_init__" not in vars(config)
        assert [k for k in vars(config) if not k.startswith("__")] == []
        # its verb is the one method it adds; its parameters (functions included) are no verbs
        assert verbs_of(actor) - verbs_of(FrozenModelActor) == {verb}
    assert {"forward_fn", "check_model"}.isdisjoint(verbs_of(RewardModelActor))


@pytest.mark.parametrize("config", [ReferenceConfig, RewardModelConfig, FrozenModelConfig])
def test_a_frozen_config_error_names_its_own_class(config):
    with pytest.raises(ConfigError, match=rf"^{config.__name__}\.micro_batch_size=0: .* fix:"):
        config("/some/model", 0)
    assert config("/m", 3) == config("/m", 3) != FrozenModelConfig("/m", 4)


@pytest.fixture(scope="module")
def value_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny policy's body with a one-label token head, saved (as a critic's would be)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("values")
    torch.manual_seed(0)
    AutoModelForTokenClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(
        out
    )
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def test_a_user_defined_frozen_role_gets_its_footprint_and_forward(value_model_dir):
    config = FrozenModelConfig(value_model_dir, micro_batch_size=2)
    fp = FrozenValues.footprint(config)
    assert (fp.kind, fp.dtype_bytes, fp.micro_batch, fp.outputs) == (RoleKind.FROZEN, 4, 2, 1)
    assert fp.shape == model_shape(value_model_dir, ModelHead.TOKEN_SCORE)

    rank = FrozenValues(Seat("values", 0, 1, (0,), config))
    batch = {
        "input_ids": torch.randint(3, 50, (5, 7)),
        "attention_mask": torch.ones(5, 7, dtype=torch.long),
    }
    with pytest.raises(ActorStateError, match="values0: values needs the role resident"):
        rank.values(batch)
    rank.start()
    rank.reload()
    assert type(rank.module).__name__.endswith("ForTokenClassification")
    assert fp.shape.params == sum(p.numel() for p in rank.module.parameters())  # what it built
    assert not any(p.requires_grad for p in rank.module.parameters())
    got = rank.values(batch)  # three micro-batches of at most 2 rows
    assert got.shape == (5, 7) and got.device.type == "cpu"
    whole = token_values(rank.module, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, whole)
    assert [s.name for s in rank.drain_spans()] == ["role.start", "role.reload", "values.values"]


def test_frozen_roles_pack_with_a_token_budget(value_model_dir, tiny_model_dir):
    """Packed forwards of the three frozen roles equal their padded ones, rows in order."""
    from colocate.roles.reward_model import init_reward_model

    torch.manual_seed(0)
    lengths = [1, 7, 3, 12, 2, 12, 5]
    batch = {
        "input_ids": torch.randint(3, 50, (len(lengths), 12)),
        "attention_mask": (torch.arange(12) < torch.tensor(lengths)[:, None]).long(),
    }
    valid = batch["attention_mask"].bool()
    reward_dir = str(init_reward_model(tiny_model_dir, value_model_dir + "-rm", seed=1))
    for cls, config_cls, path, verb in [
        (FrozenValues, FrozenModelConfig, value_model_dir, "values"),
        (ReferenceActor, ReferenceConfig, tiny_model_dir, "logprobs"),
        (RewardModelActor, RewardModelConfig, reward_dir, "scores"),
    ]:
        answers = []
        for config in (config_cls(path), config_cls(path, max_tokens_per_micro_batch=14)):
            rank = cls(Seat("r", 0, 1, (0,), config))
            rank.start()
            rank.reload()
            answers.append(getattr(rank, verb)(batch))
            spans = rank.drain_spans()
        padded, packed = answers
        assert spans[-1].detail["forwards"] == 4  # 42 tokens, no more than 14 per forward
        if padded.dim() == 2:  # per token: equal on each row's tokens, 0 past them
            padded = padded * valid
        torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_a_missing_head_is_refused_at_build_naming_the_config(value_model_dir):
    class NoHead(FrozenValues):
        needs = {"no_such_head": "use a model with one"}

    rank = NoHead(Seat("values", 0, 1, (0,), ReferenceConfig(value_model_dir)))
    with pytest.raises(ConfigError, match=r"^ReferenceConfig\.model=.*has no 'no_such_head' head"):
        rank.start()
