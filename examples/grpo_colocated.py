"""GRPO on a toy task, with the trainer (DeepSpeed) and vLLM engines sharing the same GPUs.

The task: emit tokens from a fixed set of 10 (the reward is the fraction of generated tokens in
the set; an untrained model scores ~10/1024). Each step: rollout through vLLM, rewards,
group-normalised advantages, the GRPO loss (clipped ratio against the rollout's log-probs)
trained with DeepSpeed ZeRO, then a verified weight sync back to the engines.

Runs as ``python examples/grpo_colocated.py`` (starts a local Ray: logical GPUs on a CPU
machine, the real GPUs on a CUDA one) and as ``ray job submit --working-dir . -- python
examples/grpo_colocated.py`` (joins the job's cluster). Every flag is checked before anything
starts (exit status 2 with the flag, the value and the fix). ``--save-every N`` checkpoints the
whole run; ``--resume DIR`` continues one. Metrics go to ``metrics.jsonl`` and TensorBoard.
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
    from colocate.operations.run_log import tensorboard_available

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local HF model directory (default: build the tiny model)")
    p.add_argument("--gpus", type=int, default=2, help="GPUs (trainer ranks, one per GPU)")
    p.add_argument("--engines", type=int, default=None, help="vLLM engines (default gpus / tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of each engine")
    p.add_argument("--steps", type=int, default=30, help="total steps (a resumed run included)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--max-model-len", type=int, default=512, help="prompt + completion tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--tis-cap",
        type=float,
        default=None,
        help="truncated importance sampling: cap on pi_trainer/pi_engine per token (e.g. 2)",
    )
    p.add_argument(
        "--kl-coef",
        type=float,
        default=0.0,
        help="KL penalty to a frozen reference policy (adds the reference role; 0: none)",
    )
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="rows per forward/backward on each trainer rank (gradient accumulation)",
    )
    p.add_argument(
        "--max-tokens-per-micro-batch",
        type=int,
        default=None,
        help="train (and score) packed sequences, at most this many tokens per forward/backward "
        "(at least --max-model-len; in place of --micro-batch-size)",
    )
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
        choices=["sync", "async", "partial"],
        help="async: one-step off-policy rollouts (needs --trainer-gpus and --engine-gpus); "
        "partial: groups stay in flight across the hand-over (same GPUs too)",
    )
    p.add_argument(
        "--in-flight-groups",
        type=int,
        default=None,
        help="partial: prompt groups kept in flight (default: twice --prompts)",
    )
    p.add_argument(
        "--max-staleness",
        type=int,
        default=2,
        help="partial: most trainer steps between the weights of one completion's tokens",
    )
    p.add_argument("--trainer-gpus", type=int, default=None, help="separate pools: trainer GPUs")
    p.add_argument("--engine-gpus", type=int, default=None, help="separate pools: engine GPUs")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint the run every N steps")
    p.add_argument("--resume", default=None, help="continue the run saved in this directory")
    p.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=tensorboard_available(),
        help="TensorBoard event files under OUT/tensorboard (default: on when installed)",
    )
    p.add_argument("--wandb-project", default=None, help="also log to W&B (offline mode)")
    args = p.parse_args(argv)
    check = Checker(p, args)
    for flag in ("--steps", "--prompts", "--max-tokens", "--tp", "--engines", "--save-every"):
        check.at_least(flag, 1)
    check.at_least("--gpus", 1)
    check.at_least("--trainer-gpus", 1)
    check.at_least("--engine-gpus", 1)
    check.at_least("--group-size", 2, "with one completion per prompt every advantage is zero")
    check.at_least("--max-model-len", 16)
    check.at_least("--max-staleness", 1)
    check.at_least("--in-flight-groups", 1)
    if args.in_flight_groups is not None and args.pipeline != "partial":
        p.error("--in-flight-groups goes with --pipeline partial; fix: add it, or drop the flag")
    if args.pipeline == "partial" and args.in_flight_groups is None:
        args.in_flight_groups = 2 * args.prompts
    why = "a sequence of the engines' longest length would not fit in a micro-batch"
    check.not_below("--max-tokens-per-micro-batch", "--max-model-len", why)
    check.at_least("--seed", 0)
    check.in_range("--lr", 0.0, 10.0)
    check.in_range("--bucket-mb", 0.0, 65536.0)
    check.in_range("--temperature", 0.0, 100.0, lo_open=False)
    check.in_range("--top-p", 0.0, 1.0)
    check.in_range("--tis-cap", 1.0, 1e6, lo_open=False)
    check.in_range("--kl-coef", 0.0, 100.0, lo_open=False)
    if args.kl_coef and args.pipeline == "async":
        p.error(
            "--kl-coef needs the reference role, ordered by the sync loop; fix: --pipeline sync"
        )
    if (args.trainer_gpus is None) != (args.engine_gpus is None):
        p.error("--trainer-gpus and --engine-gpus go together; fix: give both, or neither")
    args.separate = args.trainer_gpus is not None
    if args.pipeline == "async" and not args.separate:
        p.error(
            "--pipeline async overlaps rollouts with training on different GPUs; fix: add "
            "--trainer-gpus N --engine-gpus M (separate pools)"
        )
    if args.no_sync and args.sleep_level == 2 and not args.separate:
        p.error("--no-sync with --sleep-level 2: level 2 drops the engines' weights; fix: drop one")
    if args.tensorboard and not tensorboard_available():
        p.error("--tensorboard needs the tensorboard package; fix: pip install tensorboard")
    if args.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            p.error("--wandb-project needs the wandb package; fix: pip install wandb, or drop it")
    if args.separate:
        args.gpus = args.trainer_gpus + args.engine_gpus
        args.engines = args.engines or max(1, args.engine_gpus // args.tp)
    args.engines = args.engines or max(1, args.gpus // args.tp)
    check.existing_dir("--model", must_hold="config.json")
    args.state = None
    if args.resume:
        from colocate.operations.run_state import load_run

        check.existing_dir("--resume")
        try:
            args.state = load_run(Path(args.resume))
        except (FileNotFoundError, ValueError) as exc:
            p.error(f"--resume {args.resume!r}: {exc}")
        if args.state.next_step >= args.steps:
            check.fail(
                "--steps",
                args.steps,
                f"the run already has {args.state.next_step} steps",
                f"pass --steps above {args.state.next_step}",
            )
    check.writable_dir("--out")
    check.address("--address")
    args.configs = check.check_configs(lambda: build_configs(args), CONFIG_FLAGS)
    check_prompts_fit(check, args)
    return args


#: Config fields -> the flag they come from (for the library's own validation messages).
CONFIG_FLAGS = {
    "trainer_world_size": "--gpus/--trainer-gpus",
    "gpus_per_node": "--gpus",
    "engines": "--engines",
    "engine_tp": "--tp",
    "tensor_parallel_size": "--tp",
    "lr": "--lr",
    "micro_batch_size": "--micro-batch-size",
    "in_flight_groups": "--in-flight-groups",
    "max_staleness": "--max-staleness",
    "max_tokens_per_micro_batch": "--max-tokens-per-micro-batch",
    "max_model_len": "--max-model-len",
    "bucket_bytes": "--bucket-mb",
    "n": "--group-size",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
    "model": "--model",
}


def build_configs(args) -> dict:
    """The run's configs from the flags (the library validates each one)."""
    from colocate import (
        EngineConfig,
        Pipeline,
        PipelineConfig,
        Sampling,
        SyncConfig,
        TrainerConfig,
        build_tiny_model,
    )
    from placement import TopologySpec

    model = args.model or str(build_tiny_model())
    spec = TopologySpec(
        nodes=1,
        gpus_per_node=args.gpus,
        trainer_world_size=args.trainer_gpus if args.separate else args.gpus,
        engines=args.engines,
        engine_tp=args.tp,
        colocate=not args.separate,
    )
    engine = EngineConfig(
        model=model,
        tensor_parallel_size=args.tp,
        seed=args.seed,
        log_level=args.log_level,
        max_model_len=args.max_model_len,
    )
    return {
        "model": model,
        "spec": spec,
        "engine": engine,
        "trainer": TrainerConfig(
            model=model,
            lr=args.lr,
            zero_stage=args.zero_stage,
            seed=args.seed,
            micro_batch_size=args.micro_batch_size,
            max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        ),
        "sync": SyncConfig(bucket_bytes=int(args.bucket_mb * 2**20) if args.bucket_mb else None),
        "pipeline": PipelineConfig(
            mode=Pipeline(args.pipeline),
            # async: one step behind (one-step off-policy); partial: steps within a completion
            max_staleness=1 if args.pipeline == "async" else args.max_staleness,
            in_flight_groups=args.in_flight_groups,
        ),
        "sampling": Sampling(
            n=args.group_size,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        ),
    }


def check_prompts_fit(check, args) -> None:
    """The longest prompt of the task plus ``--max-tokens`` must fit the engines' context."""
    from transformers import AutoTokenizer

    from colocate.testing.toy_task import TargetTokens

    tokenizer = AutoTokenizer.from_pretrained(args.configs["model"])
    args.tokenizer = tokenizer
    args.task = TargetTokens.make(len(tokenizer), args.seed)
    longest = max(len(tokenizer.encode(p)) for p in args.task.prompts)
    if longest + args.max_tokens > args.max_model_len:
        check.fail(
            "--max-tokens",
            args.max_tokens,
            f"prompts of up to {longest} tokens + {args.max_tokens} exceed the engines' "
            f"--max-model-len {args.max_model_len}",
            f"pass --max-tokens <= {args.max_model_len - longest} or a larger --max-model-len",
        )


def main(argv=None) -> dict:
    """Runs the GRPO demo (see the module docstring); returns its summary."""
    args = parse_args(argv)
    from tqdm import tqdm

    from colocate import (
        Coordinator,
        Pipeline,
        ReferenceActor,
        grpo_loss,
        make_grpo_batch,
        reference_role,
    )
    from colocate.operations.cluster import connect
    from colocate.operations.run_log import RunLog
    from colocate.operations.run_state import RunState, capture_rng, save_run

    started = time.time()
    cfg, task, tokenizer = args.configs, args.task, args.tokenizer
    out = Path(args.out)
    connect(args.address, logical_gpus=args.gpus)
    loss = functools.partial(grpo_loss, tis_cap=args.tis_cap, kl_coef=args.kl_coef)
    # The reference is the starting policy, frozen (a resumed run keeps its starting model).
    budget = args.max_tokens_per_micro_batch  # the reference packs like the trainer
    roles = (
        [reference_role(cfg["model"], max_tokens_per_micro_batch=budget)] if args.kl_coef else []
    )
    coord = Coordinator(
        cfg["spec"],
        cfg["engine"],
        cfg["trainer"],
        loss,
        sync=cfg["sync"],
        sleep_level=args.sleep_level,
        pipeline=cfg["pipeline"],
        roles=roles,
    )
    rng = random.Random(args.seed)
    state = args.state
    first = state.next_step if state else 0
    if state:
        rng.setstate(state.random_state())
    log = RunLog(out, state.history if state else [], args.tensorboard, args.wandb_project)
    sampling = cfg["sampling"]
    phase_seconds = {"rollout": 0.0, "score": 0.0, "train": 0.0, "sync": 0.0}
    t_start = time.time()
    with coord:
        startup_s = time.time() - t_start  # Coordinator.start(): reserve to ready (ROLLOUT)
        if state:  # the engines get the resumed weights by a verified sync before serving
            coord.resume(state.trainer, state.weight_version)
            coord.rollouts.restore(state.task.get("rollouts"))  # partial: groups in flight
        setup_s = time.time() - started
        bar = tqdm(range(first, args.steps), disable=args.quiet, desc="grpo", unit="step")
        asynchronous = cfg["pipeline"].mode is Pipeline.ASYNC
        partial = cfg["pipeline"].mode is Pipeline.PARTIAL
        if asynchronous:  # batch 0 starts now; each later one while the trainer trains
            pending = coord.generate_async(task.sample_prompts(rng, args.prompts), sampling)
        for step in bar:
            t0 = time.time()
            if asynchronous:
                completions = pending.result()
                if step + 1 < args.steps:
                    prompts = task.sample_prompts(rng, args.prompts)
                    pending = coord.generate_async(prompts, sampling)
            elif partial:  # top the groups in flight up; take one batch of complete groups
                prompts = task.sample_prompts(rng, coord.rollouts.wanted())
                completions = coord.generate(prompts, sampling, groups=args.prompts)
            else:
                completions = coord.generate(task.sample_prompts(rng, args.prompts), sampling)
            rewards = [task.reward(c.token_ids) for c in completions]
            t1 = time.time()
            batch = make_grpo_batch(completions, rewards, args.group_size, tokenizer.pad_token_id)
            if roles:  # SCORE: the reference's log-probs of the rollout
                batch["ref_logprobs"] = coord.call_role("reference", ReferenceActor.logprobs, batch)
            t_score = time.time()
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
                # trainer vs engine log-probs of the sampled tokens, before any update (with
                # several optimizer steps the plain mean would mix in the policy's own updates)
                "logprob_diff": stats.get("first_logprob_diff", stats["logprob_diff"]),
                "ratio_max": stats["ratio_max"],  # max over micro-batches, steps and ranks
                "ratio_std": stats["ratio_std"],
                "weight_version_used": completions[0].weight_version,
                "weight_version": coord.weight_version,
                "staleness": stats.get("staleness", 0.0),
                "tokens": sum(len(c.token_ids) for c in completions),
                # the share of the trainer's forward tokens that were padding (packed: 0)
                "padding_fraction": stats["padding_fraction"],
                "micro_batches": stats["micro_batches"],
                "rollout_s": t1 - t0,
                "score_s": t_score - t1,
                "train_s": t2 - t_score,
                "sync_s": t3 - t2,
            }
            if "kl" in stats:  # to the reference: only a run with one has a KL
                row["kl"] = stats["kl"]
            if partial:  # versions within each completion, and the book of every group
                figures = coord.rollouts.stats
                keys = ("partial_fraction", "max_staleness", "dropped", "in_flight", "issued")
                row.update({f"rollout_{k}": figures[k] for k in keys})
            for phase in phase_seconds:
                phase_seconds[phase] += row[f"{phase}_s"]
            log.write(row)
            bar.set_postfix(
                reward=f"{row['reward']:.3f}",
                loss=f"{row['loss']:+.3f}",
                gen=f"{row['rollout_s']:.2f}s",
                train=f"{row['train_s']:.2f}s",
                sync=f"{row['sync_s']:.2f}s",
            )
            done = step + 1
            # Every N steps, and at the end (a finished run can be extended with --steps).
            if args.save_every and (done % args.save_every == 0 or done == args.steps):
                snapshot = RunState(
                    done,
                    coord.weight_version,
                    capture_rng(rng),
                    list(log.rows),
                    # partial: the groups in flight, kept tokens included, resume where they were
                    {"seed": args.seed, "rollouts": coord.rollouts.snapshot()},
                )
                save_run(
                    out, snapshot, lambda d: {"trainer": coord.save_trainer(str(d / "trainer"))}
                )
        coord.timeline.to_chrome_trace(out / "timeline.json")
        coord.timeline.to_png(out / "timeline.png", title="GRPO: one lane per GPU")
        violations = coord.timeline.ordering_violations()
        startup_span_sum = coord.timeline.startup_span_sum()
        weight_version = coord.weight_version
        hardware = coord.hardware()
        memory = coord.memory_plan
    history = log.rows
    log.plot("reward", out / "reward_curve.png", "mean reward (fraction of target tokens)")
    log.close()
    last = history[-5:]
    summary = {
        "initial_reward": history[0]["reward"],
        "final_reward": sum(r["reward"] for r in last) / len(last),
        # the largest per-step mean |trainer - engine| log-prob of the sampled tokens, each
        # taken before that step's first update (the clean training-inference gap)
        "logprob_diff": max(r.get("logprob_diff", 0.0) for r in history),
        **({"kl": sum(r["kl"] for r in last) / len(last)} if "kl" in last[0] else {}),
        "kl_coef": args.kl_coef,
        "roles": ["engine", "trainer", *(r.name for r in roles)],
        "steps": args.steps,
        "resumed_from": first if state else None,
        "phase_seconds": phase_seconds,
        "setup_seconds": setup_s,
        # start() from call to ready, beside the engine-start plus trainer-start spans (what a
        # start-up that ran them one after the other would at least take)
        "startup_seconds": startup_s,
        "startup_span_sum_seconds": startup_span_sum,
        "total_seconds": time.time() - started,
        "weight_version": weight_version,
        "ordering_violations": violations,
        "accelerator": hardware,
        # the plan checked before launch (bytes per GPU; host memory on CPU), by pool/phase
        "memory_plan": {f"{p.pool.value}/{p.phase}": p.total for p in memory.phases},
        "sync": not args.no_sync,
        "seed": args.seed,
        "topology": {
            "gpus": args.gpus,
            "engines": args.engines,
            "tp": args.tp,
            "zero_stage": args.zero_stage,
            "micro_batch_size": args.micro_batch_size,
            "max_tokens_per_micro_batch": args.max_tokens_per_micro_batch,
            "tis_cap": args.tis_cap,
            "sleep_level": args.sleep_level,
            "colocated": not args.separate,
            "pipeline": args.pipeline,
        },
        "max_staleness": max(r["staleness"] for r in history),
        **(
            {
                "completion_max_staleness": max(r["rollout_max_staleness"] for r in history),
                "partial_fraction": sum(r["rollout_partial_fraction"] for r in history)
                / len(history),
                "dropped": history[-1]["rollout_dropped"],
            }
            if partial
            else {}
        ),
        "rewards": [r["reward"] for r in history],
        "out": str(out.resolve()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"GRPO done: reward {summary['initial_reward']:.3f} -> {summary['final_reward']:.3f} "
        f"(mean of last {len(last)} steps) in {args.steps} steps, "
        f"{summary['total_seconds']:.0f} s total; weight version {weight_version}; "
        f"timeline ordering violations: {len(violations)}; outputs in {out}/"
    )
    return summary


if __name__ == "__main__":
    main()
