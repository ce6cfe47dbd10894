"""The critic role on the real stack: two DeepSpeed ZeRO-3 ranks of their own, beside the policy.

Checked: its value loss falls over a few steps on a fixed batch; it is saved with the policy
(``save_trainer``); a critic rank's death names it, the phase and the step, and recover()
replaces both ranks (their group is gone) and restores them from that checkpoint: the values
after recovery are the values at the checkpoint.
"""

import time

import pytest
import torch

from colocate import (
    ActorFailedError,
    ConfigError,
    Coordinator,
    EngineConfig,
    Fault,
    Phase,
    TrainerConfig,
    grpo_loss,
)
from colocate.roles.critic import CriticActor, CriticConfig, critic_role
from placement import TopologySpec

pytestmark = pytest.mark.timeout(900)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (6, 16), generator=g)
    mask = torch.zeros(6, 16)
    mask[:, 6:] = 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": mask,
        "returns": torch.linspace(-1, 1, 16).expand(6, 16) * mask,
        "old_values": torch.zeros(6, 16),
    }


def test_critic_learns_is_checkpointed_and_recovers(ray_local, tiny_model_dir, tmp_path):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    critic = CriticConfig(
        TrainerConfig(model=tiny_model_dir, lr=5e-3, zero_stage=3, micro_batch_size=2),
        value_clip=None,
    )
    coord = Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir, log_level="ERROR"),
        TrainerConfig(model=tiny_model_dir, zero_stage=3),
        grpo_loss,
        roles=[critic_role(critic)],
    )
    batch = _batch()
    with coord:
        losses = [
            coord.call_role("critic", CriticActor.train_values, batch)["value_loss"]
            for _ in range(6)
        ]
        assert coord.phase is Phase.SCORE
        assert losses[-1] < 0.7 * losses[0], losses
        ckpt = coord.save_trainer(str(tmp_path / "ckpt"))
        saved = coord.call_role("critic", CriticActor.values, batch)
        coord.call_role("critic", CriticActor.train_values, batch)  # moves on past the checkpoint
        assert not torch.allclose(coord.call_role("critic", CriticActor.values, batch), saved)

        coord.inject_fault("critic1", Fault.CRASH_IN_ROLE_CALL)
        t0 = time.monotonic()
        with pytest.raises(ActorFailedError) as err:
            coord.call_role("critic", CriticActor.values, batch)
        assert time.monotonic() - t0 < 60
        assert (err.value.actor, err.value.phase) == ("critic1", "score")
        coord.recover(checkpoint=ckpt)
        restored = coord.call_role("critic", CriticActor.values, batch)
        torch.testing.assert_close(restored, saved, rtol=0, atol=1e-6)

        # resume() brings the critic back to the checkpoint too, with the policy
        coord.call_role("critic", CriticActor.train_values, batch)
        assert not torch.allclose(coord.call_role("critic", CriticActor.values, batch), saved)
        coord.resume(ckpt, coord.weight_version)
        resumed = coord.call_role("critic", CriticActor.values, batch)
        torch.testing.assert_close(resumed, saved, rtol=0, atol=1e-6)
        with pytest.raises(ConfigError, match="has no 'critic' directory"):
            coord.resume(str(tmp_path), coord.weight_version)
        timeline = coord.timeline
    assert timeline.ordering_violations() == []
    assert {"restart-roles", "recover"} <= {s.phase for s in timeline.spans}
