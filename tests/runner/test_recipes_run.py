"""The repository's recipes and the runner's other paths, each run for real on the tiny model.

- ``examples/configs/ppo_toy.yaml``: GAE with the critic and the reference roles learns.
- DAPO's pieces on a task the test writes: Dr. GRPO advantages, seq-mean-token-sum-norm,
  clip-higher, dynamic sampling filtered on one function's raw score, a reward function that
  raises for some rows under ``on_error: zero``, and the built-in overlong penalty.
- Partial rollouts with RLOO and packed micro-batches, killed (SIGKILL) mid-run and resumed:
  every step logged once, the data order and the groups in flight continue.
- ``examples/configs/grpo_math.yaml``: its chat-message prompts are refused for a tokenizer
  without a chat template; with text prompts two steps of math-verify rewards and dynamic
  sampling run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from recipes import RECIPE, write_task

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(ROOT)}


def _command(config: Path, overrides) -> list[str]:
    return [sys.executable, "-m", "colocate", "train", "--config", str(config), *overrides]


def _train(cwd: Path, config: Path, *overrides: str) -> dict:
    proc = subprocess.run(
        _command(config, overrides),
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((cwd / "out" / "summary.json").read_text())


def _rows(cwd: Path) -> list[dict]:
    lines = (cwd / "out" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def vocab() -> int:
    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model

    return len(AutoTokenizer.from_pretrained(build_tiny_model()))


def test_ppo_recipe_learns(tmp_path, vocab):
    from colocate.testing.toy_task import write_dataset

    data = write_dataset(tmp_path / "data", vocab)
    summary = _train(
        tmp_path,
        ROOT / "examples/configs/ppo_toy.yaml",
        f"data.train={data['train']}",
        f"data.eval={data['eval']}",
        "steps=12",
        "eval.every=0",
        "out=out",
        "log.progress=false",
    )
    rewards = summary["rewards"]
    assert sum(rewards[-3:]) / 3 > 3 * rewards[0] and rewards[0] < 0.03, rewards
    rows = _rows(tmp_path)
    for key in ("critic/vf_loss", "critic/values/mean", "critic/returns/mean", "actor/kl"):
        assert all(key in r for r in rows), key
    assert summary["ordering_violations"] == []


DAPO = """
def flaky(prompt, completion, completion_ids, row, **_):
    if completion_ids and completion_ids[0] % 5 == 0:
        raise RuntimeError("flaky fails on this one")
    return 0.0
"""


def test_dapo_pieces_learn_and_count_errors(tmp_path, vocab):
    write_task(tmp_path, vocab)
    (tmp_path / "dapo_rewards.py").write_text(DAPO)
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(steps=12))
    summary = _train(
        tmp_path,
        tmp_path / "recipe.yaml",
        "reward.functions=[my_rewards.py:share,my_rewards.py:length,dapo_rewards.py:flaky,"
        "colocate.runner.reward_functions:overlong_penalty]",
        "reward.kwargs.overlong_penalty={max_tokens: 12, buffer: 4}",
        "reward.on_error=zero",
        "algorithm.estimator=dr_grpo",
        "algorithm.loss_agg=seq-mean-token-sum-norm",
        "algorithm.clip_high=0.28",
        "algorithm.dynamic_sampling=true",
        "algorithm.filter_metric=share",
        "trainer.lr=1e-2",
        "eval.every=0",
    )
    rows = _rows(tmp_path)
    rewards = [r["reward/share/mean"] for r in rows]
    assert sum(rewards[-3:]) / 3 > 3 * rewards[0], rewards
    assert sum(r.get("reward/errors/flaky/raised", 0) for r in rows) > 0
    # the untrained model runs to max_tokens (the penalty's -1); the shaping teaches it to stop
    penalty = [r["reward/overlong_penalty/mean"] for r in rows]
    assert penalty[0] == -1.0 and penalty[-1] > -0.5, penalty
    assert rows[-1]["response_length/mean"] < rows[0]["response_length/mean"]
    for r in rows:
        assert 1 <= r["dynamic_sampling/rounds"] <= 3
        kept = r["dynamic_sampling/kept_groups"]
        # kept groups are the batch, unless no round found any (then the last round trains)
        assert kept == 16 or r["dynamic_sampling/rounds"] == 3
    assert summary["ordering_violations"] == []


def test_partial_rollouts_killed_and_resumed(tmp_path, vocab):
    write_task(tmp_path, vocab)
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(steps=14))
    overrides = (
        "rollout.pipeline=partial",
        "rollout.in_flight_groups=24",
        "algorithm.estimator=rloo",
        "algorithm.loss_agg=seq-mean-token-mean",
        "trainer.max_tokens_per_micro_batch=512",
        "checkpoint.save_every=3",
        "eval.every=0",
        "eval.at_end=false",
    )
    first = subprocess.Popen(
        _command(tmp_path / "recipe.yaml", overrides),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # SIGKILL reaches the driver alone, as a crash would
    )
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 7:
        assert first.poll() is None, "the first run ended before it was killed"
        assert time.monotonic() < deadline, "the first run made no progress"
        time.sleep(0.2)
    try:
        os.kill(first.pid, signal.SIGKILL)  # the driver only, as `kill -9 <pid>` would
        first.wait(timeout=60)
        summary = _train(tmp_path, tmp_path / "recipe.yaml", *overrides, "checkpoint.resume=out")
    finally:
        try:  # the killed driver's own Ray (in its process group)
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(14))
    resumed = summary["resumed_from"]
    assert resumed >= 6 and resumed % 3 == 0, resumed
    for r in rows:
        assert "training/off_policy/partial_fraction" in r
        assert r["actor/padding_fraction"] == 0.0  # packed
    assert summary["ordering_violations"] == []


def test_math_recipe(tmp_path):
    from colocate.testing.arithmetic import write_dataset

    data = write_dataset(tmp_path / "data", train_rows=200, eval_rows=8)
    recipe = ROOT / "examples/configs/grpo_math.yaml"
    common = (
        "model.path=tiny",
        f"data.train={data['train']}",
        f"data.eval={data['eval']}",
        "rollout.max_tokens=32",
        "rollout.max_model_len=256",
        "rollout.prompts=4",
        "trainer.max_tokens_per_micro_batch=256",
        "reward.kwargs.overlong_penalty.max_tokens=32",
        "reward.kwargs.overlong_penalty.buffer=8",
        "eval.every=0",
        "export.every=0",
        "export.at_end=false",
        "steps=2",
        "out=out",
        "log.progress=false",
    )
    refused = subprocess.run(
        _command(recipe, common), cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "data.prompt_key" in refused.stderr and "fix:" in refused.stderr
    summary = _train(tmp_path, recipe, *common, "data.prompt_key=prompt")
    assert summary["steps"] == 2 and summary["weight_version"] == 3
    rows = _rows(tmp_path)
    assert all("reward/math_answer/mean" in r and "dynamic_sampling/rounds" in r for r in rows)
    assert len(summary["eval"]) == 2  # at the start and at the end
