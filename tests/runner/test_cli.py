"""``colocate-rl`` as a user runs it: ``python -m colocate config|plan|train`` in a subprocess.

The train refusals are the recipe's own (load_recipe): each exits 2 with the key on stderr,
before Ray is even imported. ``plan`` builds the tiny model on first use (cached after).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colocate.runner.recipe import load_recipe

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """\
model:
  path: tiny
data:
  train: prompts.jsonl
reward:
  functions: ["colocate.runner.reward_functions:math_answer"]
algorithm:
  estimator: grpo
rollout:
  max_tokens: 32
  max_model_len: 256
"""
# Runs each command line (JSON argv lists) in one process; prints each exit status and stderr,
# and whether Ray was imported at all.
_RAY_PROBE = """
import contextlib, io, json, sys
from colocate.runner.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, err.getvalue()])
print(json.dumps({"results": results, "ray_imported": "ray" in sys.modules}))
"""


def colocate_rl(*args: str, head: tuple[str, ...] = ("-m", "colocate")):
    """Runs ``python -m colocate ARGS`` (or ``python HEAD ARGS``) from the repository root."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, *head, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture
def recipe(tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_version():
    out = colocate_rl("--version")
    assert out.returncode == 0 and out.stdout.startswith("colocate-rl ")


def test_config_prints_the_resolved_recipe_which_loads_back(recipe, tmp_path):
    # overrides on both sides of the options
    out = colocate_rl("config", "trainer.lr=1e-5", "--config", recipe, "steps=3")
    assert out.returncode == 0, out.stderr
    assert "estimator: grpo" in out.stdout and "loss_agg: token-mean" in out.stdout
    assert "\nsteps: 3\n" in out.stdout
    printed = tmp_path / "printed.yaml"
    printed.write_text(out.stdout)
    assert load_recipe(str(printed), []) == load_recipe(recipe, ["trainer.lr=1e-5", "steps=3"])


def test_config_refuses_an_unknown_key(recipe):
    out = colocate_rl("config", "-c", recipe, "trainer.lrr=1")
    assert out.returncode == 2
    assert out.stderr.startswith("colocate-rl config: error: trainer.lrr=1:")
    assert "did you mean trainer.lr?" in out.stderr and out.stdout == ""


def test_plan_prints_the_itemised_table_and_checks_a_gpu_size(recipe):
    out = colocate_rl(
        "plan", "-c", recipe, "--device", "cuda", "--gpu-memory-gib", "80", "algorithm.kl_coef=0.1"
    )
    assert out.returncode == 0, out.stderr
    assert "roles: reference" in out.stdout
    for row in ("engine: KV cache", "trainer: optimizer states", "role: reference weights"):
        assert row in out.stdout
    assert "rollout" in out.stdout and "score" in out.stdout and "total" in out.stdout
    assert "fits: every phase within 80 GiB per GPU" in out.stdout


def test_plan_exits_1_when_the_plan_does_not_fit(recipe):
    out = colocate_rl("plan", "-c", recipe, "--device", "cpu", "--gpu-memory-gib", "1")
    assert out.returncode == 1
    assert "trainer: optimizer states" in out.stdout  # the table comes first
    assert out.stderr.startswith("colocate-rl plan: does not fit: phase")
    assert "of host memory (CPU run)" in out.stderr


def test_plan_refuses_a_model_path_that_is_not_a_model(recipe, tmp_path):
    out = colocate_rl("plan", "-c", recipe, f"model.path={tmp_path}")
    assert out.returncode == 2
    assert "colocate-rl plan: error: model.path=" in out.stderr
    assert "holds no config.json" in out.stderr


def test_train_refuses_a_bad_recipe_before_ray(recipe, tmp_path):
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text(RECIPE.replace("model:\n  path: tiny\n", ""))
    cases = [
        (["trainer.lr=-1"], "trainer.lr="),
        (["trainr.lr=1"], "trainr.lr="),
        (["rollout.pipeline=async"], "rollout.pipeline="),
        (["algorithm.estimator=ppo"], "algorithm.estimator="),
        (["trainer.lr"], "override="),
    ]
    argvs = [["train", "--config", recipe, *args] for args, _ in cases]
    argvs.append(["train", "--config", str(no_model)])
    started = time.monotonic()
    out = colocate_rl(json.dumps(argvs), head=("-c", _RAY_PROBE))
    assert time.monotonic() - started < 10
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    keys = [key for _, key in cases] + ["model.path is required"]
    for (rc, stderr), key in zip(probe["results"], keys, strict=True):
        assert rc == 2
        assert stderr.startswith(f"colocate-rl train: error: {key}"), stderr
        assert "fix: " in stderr and "Ray" not in stderr
    assert probe["ray_imported"] is False


def test_train_refuses_a_missing_recipe_file_through_the_entry_point(tmp_path):
    started = time.monotonic()
    out = colocate_rl("train", "--config", str(tmp_path / "absent.yaml"))
    assert time.monotonic() - started < 10
    assert out.returncode == 2
    assert out.stderr.startswith("colocate-rl train: error: --config=")
    assert "no such file" in out.stderr
