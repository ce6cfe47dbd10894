"""GRPO on a toy task, with the trainer (DeepSpeed) and vLLM engines sharing the same GPUs.

The task: emit tokens from a fixed set of 10 (the reward is the fraction of generated tokens in
the set; an untrained model scores ~10/1024). Each step: rollout through vLLM, rewards,
group-normalised advantages, the GRPO loss (clipped ratio against the rollout's log-probs)
trained with DeepSpeed ZeRO, then a verified weight sync back to the engines.

Runs as ``python examples/grpo_colocated.py`` (starts a local Ray: logical GPUs on a CPU
machine, the real GPUs on a CUDA one) and as ``ray job submit --working-dir . -- python
examples/grpo_colocated.py`` (joins the job's cluster).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local HF model directory (default: build the tiny model)")
    p.add_argument("--gpus", type=int, default=2, help="GPUs (trainer ranks, one per GPU)")
    p.add_argument("--engines", type=int, default=None, help="vLLM engines (default gpus / tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of each engine")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--sleep-level", type=int, default=1, choices=[1, 2])
    p.add_argument("--bucket-mb", type=float, default=None, help="sync bucket size (MiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-sync",
        action="store_true",
        help="negative control: never send the trained weights to the engines",
    )
    p.add_argument("--out", default="runs/grpo", help="output directory")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="ERROR", help="vLLM log level inside the engines")
    p.add_argument(
        "--pipeline",
        default="sync",
        choices=["sync", "async"],
        help="async: one-step off-policy rollouts (needs --trainer-gpus and --engine-gpus)",
    )
    p.add_argument("--trainer-gpus", type=int, default=None, help="separate pools: trainer GPUs")
    p.add_argument("--engine-gpus", type=int, default=None, help="separate pools: engine GPUs")
    args = p.parse_args(argv)
    if (args.trainer_gpus is None) != (args.engine_gpus is None):
        p.error("--trainer-gpus and --engine-gpus go together; fix: give both, or neither")
    args.separate = args.trainer_gpus is not None
    if args.pipeline == "async" and not args.separate:
        p.error(
            "--pipeline async overlaps rollouts with training on different GPUs; fix: add "
            "--trainer-gpus N --engine-gpus M (separate pools)"
        )
    if args.separate:
        args.gpus = args.trainer_gpus + args.engine_gpus
        args.engines = args.engines or max(1, args.engine_gpus // args.tp)
    args.engines = args.engines or max(1, args.gpus // args.tp)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tqdm import tqdm

    from colocate import (
        Coordinator,
        EngineConfig,
        Pipeline,
        PipelineConfig,
        Sampling,
        SyncConfig,
        TrainerConfig,
        build_tiny_model,
        grpo_loss,
        make_grpo_batch,
    )
    from colocate.cluster import connect
    from colocate.toy_task import TargetTokens
    from placement import TopologySpec

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_tiny_model())
    connect(args.address, logical_gpus=args.gpus)
    spec = TopologySpec(
        nodes=1,
        gpus_per_node=args.gpus,
        trainer_world_size=args.trainer_gpus if args.separate else args.gpus,
        engines=args.engines,
        engine_tp=args.tp,
        colocate=not args.separate,
    )
    pipeline = PipelineConfig(mode=Pipeline(args.pipeline))
    sync = SyncConfig(bucket_bytes=int(args.bucket_mb * 2**20) if args.bucket_mb else None)
    coord = Coordinator(
        spec,
        EngineConfig(
            model=model, tensor_parallel_size=args.tp, seed=args.seed, log_level=args.log_level
        ),
        TrainerConfig(model=model, lr=args.lr, zero_stage=args.zero_stage, seed=args.seed),
        grpo_loss,
        sync=sync,
        sleep_level=args.sleep_level,
        pipeline=pipeline,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    task = TargetTokens.make(len(tokenizer), args.seed)
    rng = random.Random(args.seed)
    sampling = Sampling(n=args.group_size, max_tokens=args.max_tokens, temperature=1.0)
    phase_seconds = {"rollout": 0.0, "train": 0.0, "sync": 0.0}
    history = []
    with coord, open(out / "metrics.jsonl", "w") as metrics_file:
        setup_s = time.time() - started
        bar = tqdm(range(args.steps), disable=args.quiet, desc="grpo", unit="step")
        asynchronous = pipeline.mode is Pipeline.ASYNC
        if asynchronous:  # batch 0 starts now; each later one while the trainer trains
            pending = coord.generate_async(task.sample_prompts(rng, args.prompts), sampling)
        for step in bar:
            t0 = time.time()
            if asynchronous:
                completions = pending.result()
                if step + 1 < args.steps:
                    prompts = task.sample_prompts(rng, args.prompts)
                    pending = coord.generate_async(prompts, sampling)
            else:
                completions = coord.generate(task.sample_prompts(rng, args.prompts), sampling)
            rewards = [task.reward(c.token_ids) for c in completions]
            t1 = time.time()
            batch = make_grpo_batch(completions, rewards, args.group_size, tokenizer.pad_token_id)
            stats = coord.train(batch)
            t2 = time.time()
            if args.no_sync:
                coord.skip_sync()
            else:
                coord.sync()
            t3 = time.time()
            row = {
                "step": step,
                "reward": sum(rewards) / len(rewards),
                "loss": stats["loss"],
                "clip_fraction": stats.get("clip_fraction", 0.0),
                "weight_version_used": completions[0].weight_version,
                "weight_version": coord.weight_version,
                "staleness": stats.get("staleness", 0.0),
                "rollout_s": t1 - t0,
                "train_s": t2 - t1,
                "sync_s": t3 - t2,
            }
            for phase in phase_seconds:
                phase_seconds[phase] += row[f"{phase}_s"]
            history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(
                reward=f"{row['reward']:.3f}",
                loss=f"{row['loss']:+.3f}",
                gen=f"{row['rollout_s']:.2f}s",
                train=f"{row['train_s']:.2f}s",
                sync=f"{row['sync_s']:.2f}s",
            )
        coord.timeline.to_chrome_trace(out / "timeline.json")
        coord.timeline.to_png(out / "timeline.png", title="GRPO, colocated: one lane per GPU")
        violations = coord.timeline.ordering_violations()
        weight_version = coord.weight_version
        hardware = coord.hardware()
    last = history[-5:]
    summary = {
        "initial_reward": history[0]["reward"],
        "final_reward": sum(r["reward"] for r in last) / len(last),
        "steps": args.steps,
        "phase_seconds": phase_seconds,
        "setup_seconds": setup_s,
        "total_seconds": time.time() - started,
        "weight_version": weight_version,
        "ordering_violations": violations,
        "accelerator": hardware,
        "sync": not args.no_sync,
        "seed": args.seed,
        "topology": {
            "gpus": args.gpus,
            "engines": args.engines,
            "tp": args.tp,
            "zero_stage": args.zero_stage,
            "sleep_level": args.sleep_level,
            "colocated": not args.separate,
            "pipeline": args.pipeline,
        },
        "max_staleness": max(r["staleness"] for r in history),
        "rewards": [r["reward"] for r in history],
        "out": str(out.resolve()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_rewards(history, out / "reward_curve.png")
    print(
        f"GRPO done: reward {summary['initial_reward']:.3f} -> {summary['final_reward']:.3f} "
        f"(mean of last {len(last)} steps) in {args.steps} steps, "
        f"{summary['total_seconds']:.0f} s total; weight version {weight_version}; "
        f"timeline ordering violations: {len(violations)}; outputs in {out}/"
    )
    return summary


def plot_rewards(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["reward"] for r in history], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (fraction of target tokens)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
