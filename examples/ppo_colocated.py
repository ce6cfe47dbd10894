"""PPO on the toy task: policy, reference, reward model and critic on the GPUs of the engines.

Every GPU holds a policy trainer rank (DeepSpeed ZeRO), a vLLM engine worker, a rank of the
frozen reference policy, a rank of the reward model and a rank of the critic (its own
DeepSpeed optimizer). One coordinator orders them from the hand-over table: on every GPU each
tenant that must release does so before any tenant there acquires.

The reward model is made first, in seconds: a tiny sequence-classification model of the
policy's architecture, regressed on synthetic completions labelled by the toy rule (the
fraction of tokens in the target set), saved, then loaded by the reward role. Then the runner
(``colocate-rl train``, ``docs/runner.md``) runs the recipe the flags make: the toy task's
dataset (written to ``OUT/data``), ``algorithm.estimator=gae`` (the critic role) with the KL
to the reference in the per-token reward, ``reward.model`` the fitted model, and the toy rule
as a reward function of weight 0, so the reward trained on is the reward model's while the
toy rule's is logged (``reward/target_fraction/mean``) and reported as the run's reward.

Runs as ``python examples/ppo_colocated.py`` (a local Ray: logical GPUs on a CPU machine) and
as ``ray job submit --working-dir . -- python examples/ppo_colocated.py``. Outputs in ``--out``:
metrics.jsonl, summary.json, timeline.json/png (one lane per tenant), reward_curve.png (the
reward model's score), reward_model/, data/.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

#: Flag (its dest) -> the recipe key it sets; a refusal of that key names the flag.
KEYS = {
    **{"model": "model.path", "gpus": "cluster.gpus", "address": "cluster.address"},
    **{"steps": "steps", "seed": "seed", "out": "out", "log_level": "log.vllm_log_level"},
    **{"prompts": "rollout.prompts", "samples": "rollout.group_size"},
    **{"max_tokens": "rollout.max_tokens", "max_model_len": "rollout.max_model_len"},
    **{"lr": "trainer.lr", "zero_stage": "trainer.zero_stage"},
    "max_tokens_per_micro_batch": "trainer.max_tokens_per_micro_batch",
    **{k: f"algorithm.{k}" for k in ("critic_lr", "kl_coef", "gamma", "lam")},
}
FLAGS = {key: "--" + dest.replace("_", "-") for dest, key in KEYS.items()}


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks every flag (before anything starts); exits 2 on bad usage."""
    from colocate.operations.cli import Checker

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local HF model directory (default: build the tiny model)")
    p.add_argument("--gpus", type=int, default=2, help="GPUs (each holds every tenant)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=32, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3, help="policy learning rate")
    p.add_argument("--critic-lr", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.02, help="KL penalty in the reward")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument(
        "--max-tokens-per-micro-batch",
        type=int,
        default=None,
        help="every tenant's forwards (policy, critic, reference, reward model) on packed "
        "sequences, at most this many tokens each (at least --max-model-len)",
    )
    p.add_argument("--max-model-len", type=int, default=512, help="prompt + completion tokens")
    p.add_argument("--rm-steps", type=int, default=150, help="reward-model training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ppo", help="output directory")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: local)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="ERROR", help="vLLM log level inside the engines")
    args = p.parse_args(argv)
    check = Checker(p, args)
    for flag in ("--steps", "--prompts", "--max-tokens", "--gpus", "--rm-steps", "--samples"):
        check.at_least(flag, 1)
    check.at_least("--seed", 0)
    check.in_range("--lr", 0.0, 10.0)
    check.in_range("--critic-lr", 0.0, 10.0)
    check.in_range("--kl-coef", 0.0, 100.0, lo_open=False)
    check.in_range("--gamma", 0.0, 1.0)
    check.at_least("--max-model-len", 16)
    why = "a sequence of the engines' longest length would not fit in a micro-batch"
    check.not_below("--max-tokens-per-micro-batch", "--max-model-len", why)
    check.in_range("--lam", 0.0, 1.0)
    if args.prompts * args.samples < args.gpus:
        check.fail(
            "--prompts",
            args.prompts,
            f"{args.prompts} x --samples {args.samples} rows cannot feed {args.gpus} ranks",
            f"pass --prompts >= {-(-args.gpus // args.samples)}",
        )
    check.existing_dir("--model", must_hold="config.json")
    check.writable_dir("--out")
    check.address("--address")
    args.check = check  # a refusal of the recipe, later, names its flag too
    args.recipe = check.check_recipe(lambda: _recipe(args), FLAGS)
    return args


def _recipe(args):
    """The recipe of the flags (its keys checked; the data and reward model come later)."""
    from colocate.runner.recipe import load_recipe
    from colocate.testing.tiny_model import build_tiny_model

    args.model = args.model or str(build_tiny_model())
    given = {k: getattr(args, d) for d, k in KEYS.items() if getattr(args, d) is not None}
    out = Path(args.out)
    fixed = {
        "data.train": str(out / "data" / "train.jsonl"),
        "algorithm.estimator": "gae",
        "reward.model": str(out / "reward_model"),
        "reward.functions": ["colocate.testing.toy_task:target_fraction"],
        "reward.weights": [0.0],  # logged, not trained on: the reward model's score is
        "log.progress": not args.quiet,
        "log.tensorboard": False,
        "export.at_end": False,
    }
    return load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in {**given, **fixed}.items()])


def make_reward_model(policy: str, out: Path, task, tokenizer, steps: int, seed: int) -> dict:
    """A reward model for the toy rule, trained here on synthetic completions; its figures."""
    from colocate import fit_reward_model, init_reward_model

    path = init_reward_model(policy, out, seed=seed)
    targets = sorted(task.targets)
    prompts = [tokenizer.encode(p) for p in task.prompts[:128]]
    vocab = len(tokenizer)

    def sample(rng: random.Random):
        # completions from none to all target tokens, so every reward level is seen
        frac = rng.random() ** 2
        comp = [
            rng.choice(targets) if rng.random() < frac else rng.randrange(3, vocab)
            for _ in range(rng.randint(4, 16))
        ]
        return rng.choice(prompts) + comp, task.reward(comp)

    started = time.time()
    fit = fit_reward_model(path, sample, steps=steps, seed=seed, pad_id=tokenizer.pad_token_id)
    return {"path": str(path), "seconds": time.time() - started, **fit}


def main(argv=None) -> dict:
    """Runs the PPO demo (see the module docstring); returns its summary."""
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from colocate.runner.loop import prepare, run
    from colocate.runner.summary import headline
    from colocate.testing.toy_task import TargetTokens, write_dataset

    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    write_dataset(out / "data", len(tokenizer), args.seed)
    task = TargetTokens.make(len(tokenizer), args.seed)
    rm = make_reward_model(
        args.model, out / "reward_model", task, tokenizer, args.rm_steps, args.seed
    )
    prepared = args.check.check_recipe(lambda: prepare(args.recipe), FLAGS)
    summary = run(prepared, announce=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    toy = [r["reward/target_fraction/mean"] for r in rows]  # the toy rule's, per step
    values = [rows[0]["critic/vf_loss"], rows[-1]["critic/vf_loss"]]
    summary.update(rm_scores=summary["rewards"], rewards=toy, initial_reward=toy[0])
    summary.update(final_reward=sum(toy[-5:]) / len(toy[-5:]), value_loss_first_last=values)
    summary.update(reward_model=rm, seed=args.seed)
    summary["max_tokens_per_micro_batch"] = args.max_tokens_per_micro_batch
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{headline(summary, out, 'PPO')}; kl {summary['kl']:.3f}; tenants {summary['roles']}")
    return summary


if __name__ == "__main__":
    main()
