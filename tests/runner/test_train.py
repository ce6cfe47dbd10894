"""`colocate-rl train` end to end, on a dataset file and a reward module the test writes.

Nothing from the repository's task code is used: the test writes its own prompts (made-up
words), the rewarded token ids (a column of the dataset) and the reward function (a file).
The run learns to the demo's targets, evaluates (pass@k rises), and exports an HF directory
that transformers and a fresh vLLM engine load and sample the trained behaviour from.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from recipes import RECIPE, write_task

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
STEPS = 14


def _train(cwd: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "colocate", "train", "--config", "recipe.yaml", *overrides],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("runner")
    model = str(build_tiny_model())
    task = write_task(root, len(AutoTokenizer.from_pretrained(model)))
    (root / "recipe.yaml").write_text(RECIPE.format(steps=STEPS))
    proc = _train(root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "colocate-rl done" in proc.stdout
    summary = json.loads((root / "out" / "summary.json").read_text())
    return {"root": root, "model": model, "summary": summary, **task}


def test_learns_to_the_demo_targets(run):
    summary = run["summary"]
    rewards = summary["rewards"]
    late = sum(rewards[-3:]) / 3
    assert rewards[0] < 0.03
    assert late > 4 * rewards[0] and late > 0.05, rewards
    assert summary["weight_version"] == STEPS + 1
    assert summary["ordering_violations"] == []
    assert summary["data"] == {
        "train_rows": 300,
        "eval_rows": 24,
        "filtered": 0,
        "epochs_started": 1,
    }


def test_metrics_carry_verl_names(run):
    out = run["root"] / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))
    for key in (
        "timing_s/gen",
        "timing_s/reward",
        "timing_s/train",
        "timing_s/sync",
        "perf/throughput",
        "response_length/mean",
        "response_length/clip_ratio",
        "actor/pg_loss",
        "actor/clip_frac",
        "critic/score/mean",
        "critic/advantages/mean",
        "training/off_policy/logprob_diff",
        "reward/share/mean",
        "reward/length/tokens/mean",
    ):
        assert all(key in r for r in rows), key
    # the dict-returning function's extra is its scale times the completion's tokens
    assert all(r["reward/length/tokens/mean"] == 2 * r["response_length/mean"] for r in rows)
    assert (out / "tensorboard").is_dir()


def test_eval_pass_at_k_rises(run):
    evals = run["summary"]["eval"]
    assert [e["eval/step"] for e in evals] == [0, 7, 14]
    first, last = evals[0], evals[-1]
    assert last["eval/share/pass@4"] > first["eval/share/pass@4"], evals
    assert last["eval/share/greedy"] > first["eval/share/greedy"], evals
    lines = (run["root"] / "out" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(x)["eval/step"] for x in lines] == [0, 7, 14]


def test_export_loads_in_transformers_and_vllm(run, ray_local):
    """The final export is the trained policy: both load it and emit the wanted tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from colocate import EngineConfig, Sampling
    from colocate.actors.engine import EngineActor
    from colocate.core.contract import Seat

    (export,) = run["summary"]["exports"]
    assert Path(export).name == f"step-{STEPS}"
    tok = AutoTokenizer.from_pretrained(export)
    prompts = ["ka lo mi ne", "su ta ro vi", "pe du ka lo"]
    wanted = set(run["wanted"])

    def share(ids):
        return sum(t in wanted for t in ids) / max(1, len(ids))

    hf = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32)
    hf_share = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        out = hf.generate(ids, max_new_tokens=12, do_sample=False)
        hf_share.append(share(out[0, ids.shape[1] :].tolist()))
    actor = ray.remote(EngineActor).options(num_gpus=0.5, num_cpus=0.1)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    engine = actor.remote(Seat("export", 0, 1, (9,), EngineConfig(model=export), env))
    try:
        ray.get(engine.start.remote(), timeout=300)
        greedy = Sampling(n=1, max_tokens=12, temperature=0.0)
        done = ray.get(engine.generate.remote(prompts, greedy), timeout=120)
    finally:
        ray.kill(engine)
    vllm_share = [share(c.token_ids) for c in done]
    # an untrained policy emits about 10 / 1024 of them
    assert min(hf_share) > 0.2 and min(vllm_share) > 0.2, (hf_share, vllm_share)
