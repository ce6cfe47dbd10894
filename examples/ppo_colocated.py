"""PPO on the toy task: policy, reference, reward model and critic on the GPUs of the engines.

Every GPU holds a policy trainer rank (DeepSpeed ZeRO), a vLLM engine worker, a rank of the
frozen reference policy, a rank of the reward model and a rank of the critic (its own
DeepSpeed optimizer). One coordinator orders them from the hand-over table: on every GPU each
tenant that must release does so before any tenant there acquires.

The reward model is made first, in seconds: a tiny sequence-classification model of the
policy's architecture, regressed on synthetic completions labelled by the toy rule (the
fraction of tokens in the target set), saved, then loaded by the reward role. Each step:

1. ROLLOUT: the engines sample completions;
2. SCORE (engines asleep): the reference's log-probs, the reward model's scores and the critic's
   values of the rollout; per-token rewards (score at the last token, a KL penalty to the
   reference on every token) and GAE advantages;
3. TRAIN: the policy (PPO-clip) and the critic (clipped value loss) train;
4. SYNC: a verified weight transfer to the engines.

Runs as ``python examples/ppo_colocated.py`` (a local Ray: logical GPUs on a CPU machine) and
as ``ray job submit --working-dir . -- python examples/ppo_colocated.py``. Outputs in ``--out``:
metrics.jsonl, summary.json, timeline.json/png (one lane per tenant), reward_curve.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from pathlib import Path


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
    return args


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
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from colocate import (
        Coordinator,
        CriticActor,
        CriticConfig,
        EngineConfig,
        ReferenceActor,
        RewardModelActor,
        Sampling,
        TrainerConfig,
        build_tiny_model,
        critic_role,
        grpo_loss,
        make_grpo_batch,
        ppo_advantages,
        reference_role,
        reward_model_role,
    )
    from colocate.operations.cluster import connect
    from colocate.operations.run_log import RunLog
    from colocate.testing.toy_task import TargetTokens
    from placement import TopologySpec

    started = time.time()
    out = Path(args.out)
    model = args.model or str(build_tiny_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    task = TargetTokens.make(len(tokenizer), args.seed)
    rm = make_reward_model(model, out / "reward_model", task, tokenizer, args.rm_steps, args.seed)
    connect(args.address, logical_gpus=args.gpus)
    gpus = args.gpus
    spec = TopologySpec(nodes=1, gpus_per_node=gpus, trainer_world_size=gpus, engines=gpus)
    budget = args.max_tokens_per_micro_batch  # None: padded rows everywhere
    common = {"zero_stage": args.zero_stage, "seed": args.seed}
    trainer = TrainerConfig(model, lr=args.lr, max_tokens_per_micro_batch=budget, **common)
    critic = CriticConfig(
        TrainerConfig(model, lr=args.critic_lr, max_tokens_per_micro_batch=budget, **common)
    )
    roles = [
        reference_role(model, max_tokens_per_micro_batch=budget),
        reward_model_role(rm["path"], max_tokens_per_micro_batch=budget),
        critic_role(critic),
    ]
    coord = Coordinator(
        spec,
        EngineConfig(
            model=model,
            seed=args.seed,
            log_level=args.log_level,
            max_model_len=args.max_model_len,
        ),
        trainer,
        functools.partial(grpo_loss, kl_coef=0.0),  # PPO-clip; the KL is in the reward
        roles=roles,
    )
    sampling = Sampling(n=args.samples, max_tokens=args.max_tokens)
    rng = random.Random(args.seed)
    log = RunLog(out, tensorboard=False)
    seconds = {"rollout": 0.0, "score": 0.0, "train": 0.0, "sync": 0.0}
    with coord:
        setup_s = time.time() - started
        for step in tqdm(range(args.steps), disable=args.quiet, desc="ppo", unit="step"):
            t0 = time.time()
            completions = coord.generate(task.sample_prompts(rng, args.prompts), sampling)
            rewards = [task.reward(c.token_ids) for c in completions]
            t1 = time.time()
            batch = make_grpo_batch(completions, rewards, args.samples, tokenizer.pad_token_id)
            del batch["advantages"]  # PPO's come from GAE below
            batch["ref_logprobs"] = coord.call_role("reference", ReferenceActor.logprobs, batch)
            scores = coord.call_role("reward", RewardModelActor.scores, batch)
            batch["values"] = coord.call_role("critic", CriticActor.values, batch)
            batch = ppo_advantages(
                batch, scores, kl_coef=args.kl_coef, gamma=args.gamma, lam=args.lam
            )
            t2 = time.time()
            stats = coord.train(batch)
            value = coord.call_role("critic", CriticActor.train_values, batch)
            t3 = time.time()
            coord.sync()
            t4 = time.time()
            row = {
                "step": step,
                "reward": sum(rewards) / len(rewards),  # the toy rule's
                "rm_score": float(scores.mean()),
                "loss": stats["loss"],
                "kl": stats["kl"],  # to the reference, before this step's update
                "clip_fraction": stats.get("clip_fraction", 0.0),
                "value_loss": value["value_loss"],
                "padding_fraction": stats["padding_fraction"],  # of the policy's forward tokens
                "rollout_s": t1 - t0,
                "score_s": t2 - t1,
                "train_s": t3 - t2,
                "sync_s": t4 - t3,
            }
            for phase in seconds:
                seconds[phase] += row[f"{phase}_s"]
            log.write(row)
        coord.timeline.to_chrome_trace(out / "timeline.json")
        coord.timeline.to_png(out / "timeline.png", title="PPO: one lane per GPU")
        violations = coord.timeline.ordering_violations()
        kinds = sorted(
            {s.actor.rstrip("0123456789") for s in coord.timeline.spans} - {"coordinator"}
        )
    history = log.rows
    log.plot("reward", out / "reward_curve.png", "mean reward (fraction of target tokens)")
    log.close()
    last = history[-5:]
    summary = {
        "initial_reward": history[0]["reward"],
        "final_reward": sum(r["reward"] for r in last) / len(last),
        "kl": sum(r["kl"] for r in last) / len(last),
        "steps": args.steps,
        "total_seconds": time.time() - started,
        "setup_seconds": setup_s,
        "phase_seconds": seconds,
        "ordering_violations": violations,
        "roles": kinds,
        "reward_model": rm,
        "value_loss_first_last": [history[0]["value_loss"], history[-1]["value_loss"]],
        "rewards": [r["reward"] for r in history],
        "seed": args.seed,
        "max_tokens_per_micro_batch": budget,
        "out": str(out.resolve()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"PPO done: reward {summary['initial_reward']:.3f} -> {summary['final_reward']:.3f} "
        f"(mean of last {len(last)} steps) in {args.steps} steps, "
        f"{summary['total_seconds']:.0f} s total; kl {summary['kl']:.3f}; tenants {kinds}; "
        f"timeline ordering violations: {len(violations)}; outputs in {out}/"
    )
    return summary


if __name__ == "__main__":
    main()
