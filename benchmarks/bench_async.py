"""Async (one-step off-policy) vs sync rollouts, on separate pools: steps per second, side by side.

One trainer rank (DeepSpeed ZeRO-1) on logical GPU 0 and one vLLM engine on GPU 1, the GRPO
task of the examples (``colocate.testing.toy_task``), one coordinator with
``PipelineConfig(mode=ASYNC)`` for both loops, so both use the same processes:

- sync: ``generate`` -> ``train`` -> ``sync``, in turns;
- async: the engines generate batch k+1 (``generate_async``) while the trainer trains on
  batch k; ``sync`` then waits for that rollout and sends the weights, so batch k+2 is
  generated with the weights of step k (staleness 1, checked on every train step).

Blocks of ``--steps`` steps alternate (sync, async, sync, ...; ``--blocks`` of each after one
warm-up block of each); steps per second are medians over the blocks. Keys: ``sync_steps_per_s``,
``async_steps_per_s``, ``speedup`` (target >= 1.4 on the 2-core build machine, where each
actor's torch runs on one thread), ``max_staleness`` (the largest staleness an async train step
reported: it must be exactly 1, the proof that generation overlapped training; a bound above it
is enforced by the coordinator itself, which raises ``StalenessError``), ``sync_max_staleness``
(read from the sync steps' own stats: must be 0) and ``overlapped_fraction`` (async steps that
trained on a rollout made one version back). The run exits with status 1 when either
staleness check fails.

Run: ``.venv/bin/python benchmarks/bench_async.py --json out.json`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import random
import time

import ray
from common import code_version, machine, median, verdict, write_json

from colocate import (
    Coordinator,
    EngineConfig,
    Pipeline,
    PipelineConfig,
    Sampling,
    TrainerConfig,
    build_tiny_model,
    grpo_loss,
    make_grpo_batch,
)
from colocate.operations.cluster import connect
from colocate.testing.toy_task import TargetTokens
from placement import TopologySpec

TARGET_SPEEDUP = 1.4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--steps", type=int, default=10, help="steps per block")
    p.add_argument("--blocks", type=int, default=2, help="measured blocks of each mode")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--max-staleness", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sync_block(coord, task, rng, sampling, args, pad_id) -> dict:
    t0 = time.perf_counter()
    staleness = []
    for _ in range(args.steps):
        completions = coord.generate(task.sample_prompts(rng, args.prompts), sampling)
        rewards = [task.reward(c.token_ids) for c in completions]
        stats = coord.train(make_grpo_batch(completions, rewards, args.group_size, pad_id))
        staleness.append(stats["staleness"])
        coord.sync()
    return {"seconds": time.perf_counter() - t0, "staleness": staleness}


def async_block(coord, task, rng, sampling, args, pad_id) -> dict:
    t0 = time.perf_counter()
    staleness = []
    pending = coord.generate_async(task.sample_prompts(rng, args.prompts), sampling)
    for step in range(args.steps):
        completions = pending.result()
        if step + 1 < args.steps:
            pending = coord.generate_async(task.sample_prompts(rng, args.prompts), sampling)
        rewards = [task.reward(c.token_ids) for c in completions]
        stats = coord.train(make_grpo_batch(completions, rewards, args.group_size, pad_id))
        staleness.append(stats["staleness"])
        coord.sync()
    return {"seconds": time.perf_counter() - t0, "staleness": staleness}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    model = str(build_tiny_model())
    connect(logical_gpus=2, num_cpus=2)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    task = TargetTokens.make(len(tokenizer), args.seed)
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=1, engines=1, colocate=False)
    pipeline = PipelineConfig(mode=Pipeline.ASYNC, max_staleness=args.max_staleness)
    coord = Coordinator(
        spec,
        EngineConfig(model=model, seed=args.seed, log_level="ERROR"),
        TrainerConfig(model=model, lr=3e-3, zero_stage=1, seed=args.seed),
        grpo_loss,
        pipeline=pipeline,
    )
    sampling = Sampling(n=args.group_size, max_tokens=args.max_tokens, temperature=1.0)
    rng = random.Random(args.seed)
    blocks = {"sync": [], "async": []}
    runners = {"sync": sync_block, "async": async_block}
    try:
        coord.start()
        for i in range(args.blocks + 1):  # block 0 of each is the warm-up
            for mode in ("sync", "async") if i % 2 == 0 else ("async", "sync"):
                block = runners[mode](coord, task, rng, sampling, args, tokenizer.pad_token_id)
                block["warmup"] = i == 0
                blocks[mode].append(block)
                print(f"  {mode:5s} block {i}: {args.steps / block['seconds']:.2f} steps/s")
        violations = coord.timeline.ordering_violations()
    finally:
        coord.shutdown()
        ray.shutdown()
    rate = {
        mode: median(args.steps / b["seconds"] for b in bs if not b["warmup"])
        for mode, bs in blocks.items()
    }
    async_staleness = [s for b in blocks["async"] for s in b["staleness"]]
    max_staleness = max(async_staleness)
    sync_max = max(s for b in blocks["sync"] for s in b["staleness"])
    results = {
        "sync_steps_per_s": rate["sync"],
        "async_steps_per_s": rate["async"],
        "speedup": rate["async"] / rate["sync"],
        "max_staleness": max_staleness,
        "sync_max_staleness": sync_max,
        "overlapped_fraction": sum(s == 1 for s in async_staleness) / len(async_staleness),
        "configured_max_staleness": args.max_staleness,
        "targets": {"speedup": TARGET_SPEEDUP, "max_staleness": 1, "sync_max_staleness": 0},
        "verdicts": {
            "speedup": verdict(rate["async"] / rate["sync"], TARGET_SPEEDUP, True),
            # Exactly 1: 0 means no step overlapped; above the bound the coordinator raises.
            "max_staleness": "PASS" if max_staleness == 1 else "MISS",
            "sync_max_staleness": "PASS" if sync_max == 0 else "MISS",
        },
        "blocks": blocks,
        "ordering_violations": violations,
        "config": {
            "topology": "1 node, 2 logical GPUs: 1 ZeRO-1 trainer rank + 1 engine, separate",
            **{k: v for k, v in vars(args).items() if k != "json"},
        },
        "machine": machine(),
        "code": code_version(),
        "runtime_s": time.perf_counter() - started,
    }
    for key in ("sync_steps_per_s", "async_steps_per_s", "speedup", "max_staleness"):
        print(f"{key} = {results[key]:.3f}")
    print(f"verdicts: {results['verdicts']}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    verdicts = main()["verdicts"]
    # A staleness check that fails means the benchmark did not measure what it claims.
    raise SystemExit(
        0 if verdicts["max_staleness"] == verdicts["sync_max_staleness"] == "PASS" else 1
    )
