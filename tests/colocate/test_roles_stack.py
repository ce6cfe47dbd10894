"""The reference policy and the reward model as roles on the real stack (vLLM CPU, DeepSpeed).

Two logical GPUs, each shared by a trainer rank, an engine, a reference rank and a reward-model
rank. Checked: the reference's log-probs equal the policy's before its first update (and then
differ, so the KL term is live); the reward role's scores equal the same model run in the
driver; every release before every acquisition per GPU; a reward rank's death names it, the
phase and the step, and recover() replaces it, rebuilt from its path.
"""

import functools
import time

import pytest
import torch

from colocate import (
    ActorFailedError,
    Coordinator,
    EngineConfig,
    Fault,
    Phase,
    ReferenceActor,
    RewardModelActor,
    Sampling,
    TrainerConfig,
    grpo_loss,
    init_reward_model,
    make_grpo_batch,
    reference_role,
    reward_model_role,
)
from placement import TopologySpec

pytestmark = pytest.mark.timeout(900)

PROMPTS = ["kato rimu", "sena lo pe", "vi da go", "ru hi ze"]
SAMPLING = Sampling(n=4, max_tokens=8)


def _driver_scores(path, batch):
    from transformers import AutoModelForSequenceClassification

    from colocate.roles.reward_model import sequence_scores

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"])


def test_reference_and_reward_roles_on_the_real_stack(ray_local, tiny_model_dir, tmp_path):
    rm = str(init_reward_model(tiny_model_dir, tmp_path / "rm", seed=1))
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    roles = [reference_role(tiny_model_dir), reward_model_role(rm, micro_batch_size=3)]
    coord = Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir, log_level="ERROR"),
        TrainerConfig(model=tiny_model_dir, lr=2e-2, zero_stage=3),
        functools.partial(grpo_loss, kl_coef=0.1),
        roles=roles,
    )
    with coord:
        pad = 2
        stats = []
        for _ in range(2):
            completions = coord.generate(PROMPTS, SAMPLING)
            rewards = [sum(t < 300 for t in c.token_ids) / len(c.token_ids) for c in completions]
            batch = make_grpo_batch(completions, rewards, SAMPLING.n, pad)
            batch["ref_logprobs"] = coord.call_role("reference", ReferenceActor.logprobs, batch)
            assert coord.phase is Phase.SCORE
            scores = coord.call_role("reward", RewardModelActor.scores, batch)
            assert scores.shape == (len(completions),)
            torch.testing.assert_close(scores, _driver_scores(rm, batch), rtol=0, atol=1e-5)
            stats.append(coord.train(batch))
            coord.sync()
        # before the first update the trainer's log-probs are the reference's (same weights)
        assert stats[0]["ref_diff"] < 1e-5 and stats[0]["kl"] < 1e-8, stats[0]
        assert stats[1]["ref_diff"] > 1e-3 and stats[1]["kl"] > 0, stats[1]

        held = batch
        before = coord.call_role("reward", RewardModelActor.scores, held)
        coord.train(held)
        coord.sync()
        coord.generate(PROMPTS, SAMPLING)
        coord.inject_fault("reward1", Fault.CRASH_IN_ROLE_CALL)
        t0 = time.monotonic()
        with pytest.raises(ActorFailedError) as err:
            coord.call_role("reward", RewardModelActor.scores, held)
        assert time.monotonic() - t0 < 60
        assert (err.value.actor, err.value.phase, err.value.step) == ("reward1", "score", 3)
        assert coord.phase is Phase.FAILED
        coord.recover()  # reward1 replaced, reloaded from its path
        assert coord.phase is Phase.ROLLOUT
        coord.generate(PROMPTS, SAMPLING)
        after = coord.call_role("reward", RewardModelActor.scores, held)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
        timeline = coord.timeline
    assert timeline.ordering_violations() == []
    names = {(s.actor, s.name) for s in timeline.spans}
    for actor in ("reference0", "reference1", "reward0", "reward1"):
        assert {(actor, "role.reload"), (actor, "role.offload")} <= names, actor
    lanes = {lane for s in timeline.spans if s.actor.startswith("reward") for lane in s.lanes}
    assert lanes == {0, 1}
