"""Multi-turn agent episodes through the runner, for real on the tiny model.

- ``examples/configs/agent_toy.yaml`` (GRPO, ``colocate.testing.tool_task:LookupEnv``): every
  episode calls the tool, sees its result as an observation, and the final turn's reward rises,
  in training and in the evaluations (episodes too) before the first and after the last step.
- The same environment under PPO's GAE with the critic and a KL penalty to the reference, in
  the partial pipeline: the roles score multi-turn rows, episodes are paused across the
  hand-over and resumed, and every step trains.
- With DAPO's dynamic sampling filtering groups on the environment's reward, and a reward
  function that raises for some episodes under ``on_error: drop``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples/configs/agent_toy.yaml"


def _train(cwd: Path, *overrides: str) -> tuple[dict, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "colocate", "train", "--config", str(RECIPE), *overrides]
    proc = subprocess.run(
        [*command, "out=out", "log.progress=false"],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (cwd / "out" / "metrics.jsonl").read_text().splitlines()]
    return json.loads((cwd / "out" / "summary.json").read_text()), rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model
    from colocate.testing.toy_task import write_dataset

    vocab = len(AutoTokenizer.from_pretrained(build_tiny_model()))
    return write_dataset(tmp_path_factory.mktemp("toy"), vocab)


def test_agent_recipe_learns(tmp_path, data):
    summary, rows = _train(
        tmp_path,
        f"data.train={data['train']}",
        f"data.eval={data['eval']}",
        "steps=30",
        "eval.at_start=true",
        "eval.at_end=true",
        "eval.prompts=8",
        "eval.k=2",
    )
    rewards = summary["rewards"]
    assert rewards[0] < 0.05 and sum(rewards[-5:]) / 5 > 0.5, rewards
    evals = [json.loads(x) for x in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert [e["eval/step"] for e in evals] == [0.0, 30.0]
    # the environment's reward, greedy and sampled, rises on the eval rows as in training
    assert evals[1]["eval/env/greedy"] > evals[0]["eval/env/greedy"] + 0.3, evals
    assert evals[1]["eval/env/mean@2"] > evals[0]["eval/env/mean@2"] + 0.3, evals
    for r in rows:
        # two model turns, one tool call and its 4 observation tokens, per episode
        assert r["agent/turns/mean"] == 2.0
        assert r["agent/lookups/mean"] == 1.0
        assert r["agent/observation_tokens/mean"] == 4.0
        assert r["agent/tool_errors"] == 0 and r["agent/tool_timeouts"] == 0
        # the response length counts sampled tokens only (two turns of at most 12)
        assert r["response_length/max"] <= 24
    assert summary["ordering_violations"] == []


def test_agent_episodes_with_roles_in_the_partial_pipeline(tmp_path, data):
    summary, rows = _train(
        tmp_path,
        f"data.train={data['train']}",
        "steps=4",
        "rollout.prompts=4",
        "rollout.group_size=4",
        "rollout.pipeline=partial",
        "rollout.in_flight_groups=8",
        "algorithm.estimator=gae",
        "algorithm.kl_coef=0.05",
        "trainer.max_tokens_per_micro_batch=512",
    )
    assert [r["step"] for r in rows] == list(range(4))
    for r in rows:
        assert r["agent/turns/mean"] == 2.0
        for key in ("critic/vf_loss", "critic/values/mean", "actor/kl"):
            assert key in r, key
    assert summary["ordering_violations"] == []


FLAKY = """
def flaky(prompt, completion, completion_ids, row, **_):
    if len(prompt) % 4 == 0:  # the whole group of a prompt fails
        raise RuntimeError("flaky fails on this one")
    return 0.0
"""


def test_agent_episodes_with_dynamic_sampling_and_dropped_reward_errors(tmp_path, data):
    (tmp_path / "flaky.py").write_text(FLAKY)
    _, rows = _train(
        tmp_path,
        f"data.train={data['train']}",
        "steps=3",
        "rollout.prompts=4",
        "rollout.group_size=4",
        "algorithm.dynamic_sampling=true",
        "algorithm.filter_metric=env",
        "reward.functions=[flaky.py:flaky]",
        "reward.on_error=drop",
    )
    # a raising reward function drops its episodes' groups; the rest train, with their figures
    assert sum(r.get("reward/errors/flaky/raised", 0) for r in rows) > 0
    for r in rows:
        assert 1 <= r["dynamic_sampling/rounds"] <= 3
        # the batch is full of informative groups, unless no round found any
        assert r["dynamic_sampling/kept_groups"] == 4 or r["dynamic_sampling/rounds"] == 3
        assert r["agent/turns/mean"] == 2.0
    # the untrained model's groups often all score 0 on the environment: those are dropped
    assert sum(r["dynamic_sampling/dropped_groups"] for r in rows) > 0
