"""PPO's advantages (pure): per-token rewards, GAE against a plain loop, whitening."""

import random

import pytest
import torch

from colocate.algorithms.ppo import gae, ppo_advantages, token_rewards

pytestmark = pytest.mark.fast


def _loop_gae(rewards, values, gamma, lam):
    """GAE over one completion, as written in the papers."""
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_v = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_v - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def test_gae_matches_the_textbook_loop_row_by_row():
    rng = random.Random(0)
    rows, width = 5, 12
    mask = torch.zeros(rows, width)
    spans = []
    for i in range(rows):
        start = rng.randint(1, 4)
        stop = rng.randint(start + 1, width)  # a prompt, a completion, then padding
        mask[i, start:stop] = 1
        spans.append((start, stop))
    rewards = torch.randn(rows, width) * mask
    values = torch.randn(rows, width)
    adv, ret = gae(rewards, values * mask, mask, gamma=0.9, lam=0.8)
    for i, (start, stop) in enumerate(spans):
        want = _loop_gae(rewards[i, start:stop].tolist(), values[i, start:stop].tolist(), 0.9, 0.8)
        torch.testing.assert_close(adv[i, start:stop], torch.tensor(want), rtol=0, atol=1e-5)
        assert adv[i, :start].abs().sum() == 0 and adv[i, stop:].abs().sum() == 0
    torch.testing.assert_close(ret, (adv + values) * mask)


def _batch():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    old = torch.tensor([[0, 0, -1.0, -2.0, -0.5, 0], [0, -1.0, -1.5, 0, 0, 0]])
    ref = torch.tensor([[0, 0, -1.5, -2.0, -0.25, 0], [0, -1.0, -1.0, 0, 0, 0]])
    return {"completion_mask": mask, "old_logprobs": old, "ref_logprobs": ref}


def test_token_rewards_put_the_score_on_the_last_completion_token():
    b = _batch()
    r = token_rewards(b, torch.tensor([1.0, 2.0]), kl_coef=0.1)
    kl = -0.1 * (b["old_logprobs"] - b["ref_logprobs"]) * b["completion_mask"]
    want = kl.clone()
    want[0, 4] += 1.0
    want[1, 2] += 2.0
    torch.testing.assert_close(r, want)


def test_ppo_advantages_are_whitened_over_completion_tokens():
    b = {**_batch(), "values": torch.randn(2, 6)}
    out = ppo_advantages(b, torch.tensor([0.3, 0.9]), kl_coef=0.05)
    m = b["completion_mask"] > 0
    adv = out["advantages"][m]
    assert abs(float(adv.mean())) < 1e-5 and abs(float(adv.std(unbiased=False)) - 1) < 1e-3
    assert out["advantages"][~m].abs().sum() == 0
    torch.testing.assert_close(out["old_values"], b["values"] * b["completion_mask"])
