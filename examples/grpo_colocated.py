"""GRPO on a toy task, with the trainer (DeepSpeed) and vLLM engines sharing the same GPUs.

The task: emit tokens from a fixed set of 10 (the reward is the fraction of generated tokens in
the set; an untrained model scores ~10/1024). A thin wrapper over the runner (``colocate-rl
train``, ``docs/runner.md``): the task is written as a dataset to ``OUT/data``, the flags become
recipe keys, and the runner runs the steps (rollout, rewards, group-normalised advantages,
DeepSpeed ZeRO training, a verified weight sync), metrics, checkpoints and the timeline.

Runs as ``python examples/grpo_colocated.py`` (starts a local Ray: logical GPUs on a CPU
machine, the real GPUs on a CUDA one) and as ``ray job submit --working-dir . -- python
examples/grpo_colocated.py`` (joins the job's cluster). Every flag is checked before anything
starts (exit status 2 with the flag, the value and the fix). ``--save-every N`` checkpoints the
whole run; ``--resume DIR`` continues one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Flag (its dest) -> the recipe key it sets, by section; a refusal of that key names the flag.
_SECTIONS = {
    "cluster": "address gpus engines tp trainer_gpus engine_gpus sleep_level",
    "rollout": "prompts group_size max_tokens max_model_len temperature top_p pipeline "
    "in_flight_groups max_staleness",
    "trainer": "lr zero_stage micro_batch_size max_tokens_per_micro_batch",
    "algorithm": "kl_coef tis_cap",
    "checkpoint": "save_every resume",
    "log": "tensorboard wandb_project",
}
KEYS = {dest: f"{s}.{dest}" for s, dests in _SECTIONS.items() for dest in dests.split()} | {
    **{"steps": "steps", "seed": "seed", "out": "out", "model": "model.path"},
    **{"bucket_mb": "trainer.sync_bucket_mb", "no_sync": "skip_sync"},
    "log_level": "log.vllm_log_level",
}
FLAGS = {key: "--" + dest.replace("_", "-") for dest, key in KEYS.items()}


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks every flag, writes the task's data and prepares the run (no Ray yet).

    Exits 2 on bad usage, naming the flag. ``args.prepared`` is the runner's checked run.
    """
    from colocate.operations.cli import Checker
    from colocate.operations.run_log import tensorboard_available

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--model", help="local HF model directory (default: build the tiny model)")
    add("--gpus", type=int, default=2, help="GPUs (trainer ranks, one per GPU)")
    add("--engines", type=int, default=None, help="vLLM engines (default gpus / tp)")
    add("--tp", type=int, default=1, help="tensor-parallel size of each engine")
    add("--steps", type=int, default=30, help="total steps (a resumed run included)")
    add("--prompts", type=int, default=16, help="prompts per step")
    add("--group-size", type=int, default=8, help="completions per prompt")
    add("--max-tokens", type=int, default=12)
    add("--max-model-len", type=int, default=512, help="prompt + completion tokens")
    add("--temperature", type=float, default=1.0)
    add("--top-p", type=float, default=1.0)
    add("--lr", type=float, default=3e-3)
    add("--tis-cap", type=float, help="truncated importance sampling: cap on the ratio per token")
    add("--kl-coef", type=float, default=0.0, help="KL to a frozen reference (adds its role)")
    add("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    add("--micro-batch-size", type=int, help="rows per forward/backward on each trainer rank")
    add("--max-tokens-per-micro-batch", type=int, help="train packed: most tokens per pass")
    add("--sleep-level", type=int, default=1, choices=[1, 2])
    add("--bucket-mb", type=float, default=None, help="sync bucket size (MiB)")
    add("--seed", type=int, default=0)
    add("--no-sync", action="store_true", help="negative control: never sync the trained weights")
    add("--out", default="runs/grpo", help="output directory")
    add("--address", help="Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--log-level", default="ERROR", help="vLLM log level inside the engines")
    modes = ["sync", "async", "partial"]
    add("--pipeline", default="sync", choices=modes, help="async: on separate pools")
    add("--in-flight-groups", type=int, help="partial: groups in flight (default 2 x --prompts)")
    add("--max-staleness", type=int, default=2, help="partial: most steps within a completion")
    add("--trainer-gpus", type=int, default=None, help="separate pools: trainer GPUs")
    add("--engine-gpus", type=int, default=None, help="separate pools: engine GPUs")
    add("--save-every", type=int, default=None, help="checkpoint the run every N steps")
    add("--resume", default=None, help="continue the run saved in this directory")
    tb = tensorboard_available()
    add("--tensorboard", action=argparse.BooleanOptionalAction, default=tb, help="OUT/tensorboard")
    add("--wandb-project", default=None, help="also log to W&B (offline mode)")
    args = p.parse_args(argv)
    # The runner's recipe checks the rest (counts, ranges, the address), naming the flag.
    check = Checker(p, args)
    check.at_least("--group-size", 2, "with one completion per prompt every advantage is zero")
    check.at_least("--max-model-len", 16)
    if args.in_flight_groups is not None and args.pipeline != "partial":
        p.error("--in-flight-groups goes with --pipeline partial; fix: add it, or drop the flag")
    why = "a sequence of the engines' longest length would not fit in a micro-batch"
    check.not_below("--max-tokens-per-micro-batch", "--max-model-len", why)
    if args.kl_coef and args.pipeline == "async":
        p.error(
            "--kl-coef needs the reference role, ordered by the sync loop; fix: --pipeline sync"
        )
    if (args.trainer_gpus is None) != (args.engine_gpus is None):
        p.error("--trainer-gpus and --engine-gpus go together; fix: give both, or neither")
    if args.pipeline == "async" and args.trainer_gpus is None:
        p.error(
            "--pipeline async overlaps rollouts with training on different GPUs; fix: add "
            "--trainer-gpus N --engine-gpus M (separate pools)"
        )
    if args.no_sync and args.sleep_level == 2 and args.trainer_gpus is None:
        p.error("--no-sync with --sleep-level 2: level 2 drops the engines' weights; fix: drop one")
    if args.tensorboard and not tb:
        p.error("--tensorboard needs the tensorboard package; fix: pip install tensorboard")
    if args.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            p.error("--wandb-project needs the wandb package; fix: pip install wandb, or drop it")
    check.existing_dir("--model", must_hold="config.json")
    check.existing_dir("--resume")
    check.writable_dir("--out")
    args.prepared = check.check_recipe(lambda: _prepare(check, args), FLAGS)
    return args


def _prepare(check, args):
    """The toy task in ``OUT/data`` (its prompts must fit), the flags as a recipe, checked."""
    from transformers import AutoTokenizer

    from colocate.runner.loop import prepare
    from colocate.runner.recipe import load_recipe
    from colocate.testing.tiny_model import build_tiny_model
    from colocate.testing.toy_task import TargetTokens, write_dataset

    args.model = args.model or str(build_tiny_model())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = TargetTokens.make(len(tokenizer), args.seed).prompts
    longest = max(len(tokenizer.encode(x)) for x in prompts)
    if longest + args.max_tokens > args.max_model_len:
        check.fail(
            "--max-tokens",
            args.max_tokens,
            f"prompts of up to {longest} tokens + {args.max_tokens} exceed the engines' "
            f"--max-model-len {args.max_model_len}",
            f"pass --max-tokens <= {args.max_model_len - longest} or a larger --max-model-len",
        )
    given = {k: getattr(args, d) for d, k in KEYS.items() if getattr(args, d) is not None}
    overrides = [f"{key}={json.dumps(value)}" for key, value in given.items()]
    data = Path(args.out) / "data"
    overrides += [f"data.train={json.dumps(str(data / 'train.jsonl'))}", "export.at_end=false"]
    overrides += ['reward.functions=["colocate.testing.toy_task:target_fraction"]']
    config = load_recipe(None, [*overrides, f"log.progress={json.dumps(not args.quiet)}"])
    write_dataset(data, len(tokenizer), args.seed)
    return prepare(config)


def main(argv=None) -> dict:
    """Runs the GRPO demo (see the module docstring); returns its summary."""
    args = parse_args(argv)
    from colocate.runner.loop import run
    from colocate.runner.summary import headline

    summary = run(args.prepared, announce=False)
    libs = args.prepared.libs
    echoed = ("tp", "zero_stage", "micro_batch_size", "max_tokens_per_micro_batch", "tis_cap")
    topology = {k: getattr(args, k) for k in (*echoed, "sleep_level", "pipeline")}
    topology.update(gpus=args.prepared.gpus, engines=libs.spec.engines)
    topology["colocated"] = args.trainer_gpus is None
    summary.update(kl_coef=args.kl_coef, sync=not args.no_sync, seed=args.seed, topology=topology)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(headline(summary, args.out, "GRPO"))
    return summary


if __name__ == "__main__":
    main()
