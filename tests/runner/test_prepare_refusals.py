"""``colocate-rl train`` refusing what :func:`colocate.runner.loop.prepare` finds, before Ray.

Each case is a recipe that loads (the schema accepts it) but cannot run: a missing file, a
reward module that does not import, a column that is not there, a cluster that does not
answer. Each exits 2 with the key, the value and the fix on stderr, quickly, and Ray is not
even imported. The cases run in one process (see ``_PROBE``) to pay the imports once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from recipes import RECIPE, write_task

ROOT = Path(__file__).resolve().parents[2]
# Runs each command line (JSON argv lists) in one process; prints each exit status, stderr and
# seconds taken, and whether Ray was imported at all.
_PROBE = """
import contextlib, io, json, sys, time
from colocate.runner.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, err.getvalue(), time.monotonic() - started])
print(json.dumps({"results": results, "ray_imported": "ray" in sys.modules}))
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def task(tmp_path) -> Path:
    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model

    write_task(tmp_path, len(AutoTokenizer.from_pretrained(str(build_tiny_model()))))
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(steps=3))
    (tmp_path / "raises.py").write_text("raise RuntimeError('no config here')\n")
    (tmp_path / "strict.py").write_text(
        "def share(prompt, completion, completion_ids, row):\n    return 0.0\n"
    )
    chat = {"messages": [{"role": "user", "content": "ka lo mi"}], "wanted": [3]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    (tmp_path / "not-a-run").mkdir()
    return tmp_path


def test_train_refuses_what_prepare_finds_before_ray(task):
    address = f"127.0.0.1:{_closed_port()}"
    not_a_run = task / "not-a-run"
    # a checkpoint of a run over 5 rows: this recipe's 300 rows cannot continue its order
    other = task / "other-run"
    other.mkdir(exist_ok=True)
    sampler = {"size": 5, "seed": 0, "shuffle": True, "epoch": 0, "position": 1}
    state = {"next_step": 1, "weight_version": 2, "rng": [3, [0], None]}
    (other / "run.json").write_text(json.dumps({**state, "task": {"sampler": sampler}}))
    # (overrides, how stderr starts after "error: ", what else it says)
    cases = [
        (["data.train=absent.jsonl"], "data.train='absent.jsonl': no such file", []),
        (
            ["reward.functions=[absent.py:share]", "reward.kwargs={}"],
            "reward.functions[0]='absent.py:share': no file",
            [],
        ),
        (
            ["reward.functions=[raises.py:share]", "reward.kwargs={}"],
            "reward.functions[0]='raises.py:share': importing",
            ["raised RuntimeError: no config here"],
        ),
        # the function takes no arguments of its own: the fix names its kwargs' key
        (
            ["reward.functions=[strict.py:share,my_rewards.py:length]", "reward.kwargs.share.x=2"],
            "reward.functions[0]='strict.py:share': cannot be called",
            ["unexpected keyword argument 'x'", "reward.kwargs.share"],
        ),
        (["data.eval=null", "eval.every=5"], "eval.every=5: there is no eval split", []),
        (
            ["algorithm.dynamic_sampling=true", "algorithm.filter_metric=shares"],
            "algorithm.filter_metric='shares': names no reward function",
            ["'share'"],
        ),
        (
            ["algorithm.dynamic_sampling=true", "algorithm.filter_metric=env"],
            "algorithm.filter_metric='env': is the environment's reward",
            ["set agent.env"],
        ),
        (
            [f"checkpoint.resume={not_a_run}"],
            f"checkpoint.resume='{not_a_run}':",
            ["no checkpoints/step<N>", "checkpoint.save_every"],
        ),
        (
            [f"checkpoint.resume={other}"],
            f"checkpoint.resume='{other}': its data order does not continue",
            ["size=5", "data.train"],
        ),
        ([f"model.path={task}"], f"model.path='{task}': holds no config.json", []),
        (["data.prompt_key=prompt"], "data.prompt_key='prompt': no such column", ["question"]),
        (
            ["data.train=chat.jsonl", "data.prompt_key=messages", "data.eval=null"],
            "data.prompt_key='messages': the column holds chat messages",
            ["no chat template"],
        ),
        (["data.max_prompt_tokens=1"], "data.max_prompt_tokens=1: every prompt", []),
        ([f"cluster.address={address}"], f"cluster.address='{address}': does not answer", []),
    ]
    argvs = [["train", "--config", "recipe.yaml", *args] for args, _, _ in cases]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=task,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    for (rc, stderr, seconds), (args, start, says) in zip(probe["results"], cases, strict=True):
        assert rc == 2, (args, stderr)
        assert stderr.startswith(f"colocate-rl train: error: {start}"), stderr
        assert stderr.count("; fix: ") == 1 and "Traceback" not in stderr, stderr
        assert all(s in stderr for s in says), (says, stderr)
        # the first case also pays the imports of transformers and datasets
        assert seconds < 20, (args, seconds)
    assert probe["ray_imported"] is False
