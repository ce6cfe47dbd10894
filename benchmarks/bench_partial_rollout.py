"""Partial rollouts vs the sync pipeline: GRPO steps on a long-tailed workload, same GPUs.

Coordinators one after the other in one process, on the same topology (2 logical GPUs,
colocated: 2 DeepSpeed ZeRO-3 trainer ranks and 2 vLLM CPU engines), the same model, seeds,
sampling, train batch (``--groups`` B groups of ``--n`` completions) and number of steps, in
two modes:

- sync: ``PipelineConfig()``; each step generates B prompts' groups, every completion to its
  end;
- partial: ``PipelineConfig(mode="partial", in_flight_groups=K, max_staleness=S,
  staleness_policy="wait")`` (K = ``--in-flight``, default 2B; S = ``--max-staleness``);
  each step passes ``coord.rollouts.wanted()`` new prompts and takes B complete groups, the
  oldest first; the unfinished requests are kept and resumed after the sync.

Both train on packed sequences (``max_tokens_per_micro_batch`` = ``--budget``, default four
times ``max_model_len`` = 64 + ``--max-tokens``), so a train step follows the real tokens of
its batch, not its longest row. The model is a tiny Llama (``TinyModelSpec``: ``--hidden``,
``--intermediate``, ``--layers``, ``--heads``): small enough that on CPU a decode step costs
mostly its fixed overhead, which is where a near-empty batch waiting for its longest
completion loses time.

Order: ``--repeats`` blocks per mode, each block a fresh coordinator, in the balanced order
sync, partial, partial, sync (ABBA, repeated): the first coordinator in a process runs
slower and the machine's load drifts, and the order cancels a linear drift. Each mode's
figures pool its blocks' timed steps.

Each step is generate -> score (a deterministic reward of the tokens, then
``make_grpo_batch``) -> ``coord.train`` -> ``coord.sync``. Prompts: one deterministic stream
(``prompt_text(i)``); the sync mode takes B per step, the partial mode takes what ``wanted()``
asks, from the same stream in the same order (so it has read further ahead: up to K - B
prompts queued or in flight). A mode's ``j``-th block starts at prompt ``j * 100000``, so the
two modes' ``j``-th blocks read the same stretch.

Workload (long-tailed completion lengths): the untrained tiny model samples near-uniform
tokens (temperature 1), and ``Sampling(extra={"stop_token_ids": ...})`` holds
``--stop-ids`` token ids (plus the tokenizer's EOS, which stops too). A completion's length is
then about geometric with stop probability p = (stop ids + 1) / vocabulary per token
(mean ~ 1/p), capped at ``--max-tokens``: most completions are short, and each step's longest
is several times the median. The JSON's ``workload`` states the parameters and each mode's
measured lengths (mean, median, p90, max, and the mean over steps of the longest / median
ratio).

Timing: the first ``--warmup`` steps of each block are not timed (the first pays the train
row's first hand-over; the partial mode's also fill the pipeline). Over the ``--steps`` timed
steps of each block, per phase, the driver's wall seconds: ``generate_s``, ``score_s``
(reward and batch), ``train_s``, ``sync_s``; their sum is ``wall_s``.

Keys: ``tokens_per_s_sync`` and ``tokens_per_s_partial`` = completion tokens of the
completions trained on in the timed steps / ``wall_s`` of those steps; ``speedup`` =
``tokens_per_s_partial / tokens_per_s_sync`` (target >= 1.3 on the 2-core CPU machine).
``generated_tokens_per_s_*`` counts the tokens generated in the timed windows instead
(partial: trained + kept in flight at a window's end - kept at its start; the kept tokens
read from ``coord.rollouts.buffer``). Partial mode's figures over its timed steps, from
``coord.rollouts.stats``: ``max_staleness`` (most weight versions within one trained
completion; target <= S = 2), ``partial_fraction`` (mean over steps of the share of trained
completions whose tokens span more than one version), ``staleness_histogram`` (summed over
steps), ``dropped`` (groups dropped, total; target 0 under the wait policy), ``rounds``.
``ordering_violations``: ``coord.timeline.ordering_violations()`` of every coordinator
(target 0). Verdicts (``*_pass`` and ``pass``) are computed from those measured numbers.

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_partial_rollout.py --json out.json``
(minutes; not a test).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import ray
from common import add_model_args, code_version, machine, model_spec, write_json

from colocate import (
    Coordinator,
    EngineConfig,
    PipelineConfig,
    Sampling,
    TrainerConfig,
    build_tiny_model,
    grpo_loss,
    make_grpo_batch,
)
from colocate.operations.cluster import connect
from placement import TopologySpec

TARGET_SPEEDUP = 1.3
TARGET_MAX_STALENESS = 2
PROMPTS_PER_BLOCK = 100_000
WORDS = ("kato", "rimu", "sela", "ponu", "vari", "nemo", "tuli", "basa", "orin", "leku")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--groups", type=int, default=8, help="B: prompt groups per train batch")
    p.add_argument("--n", type=int, default=4, help="completions per prompt (Sampling.n)")
    p.add_argument("--in-flight", type=int, help="K: partial in_flight_groups (default 2B)")
    p.add_argument("--max-staleness", type=int, default=2, help="S: partial max_staleness")
    p.add_argument("--max-tokens", type=int, default=384, help="Sampling.max_tokens (the cap)")
    p.add_argument("--stop-ids", type=int, default=10, help="stop token ids (ids 3, 4, ...)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per block")
    p.add_argument("--steps", type=int, default=25, help="timed steps per block")
    add_model_args(p, hidden=128, intermediate=256, layers=2)
    p.add_argument("--budget", type=int, help="max_tokens_per_micro_batch (default 4 x max)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=2, help="blocks per mode, in the order ABBA ABBA ..."
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        p.error("need --repeats >= 1, --steps >= 1, --warmup >= 0")
    if args.in_flight is None:
        args.in_flight = 2 * args.groups
    if args.in_flight < args.groups:
        p.error("--in-flight must be at least --groups")
    return args


def block_order(repeats: int) -> list[str]:
    """sync, partial, partial, sync, sync, ...: ``repeats`` blocks per mode, order balanced."""
    pairs = [("sync", "partial") if i % 2 == 0 else ("partial", "sync") for i in range(repeats)]
    return [name for pair in pairs for name in pair]


def prompt_text(i: int) -> str:
    """The ``i``-th prompt of the deterministic stream both modes read."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4)]
    return f"{' '.join(words)} {i}"


def reward(token_ids) -> float:
    """A cheap deterministic reward of a completion's tokens: the share of even token ids."""
    return sum(t % 2 == 0 for t in token_ids) / max(1, len(token_ids))


def held_tokens(coord) -> int:
    """Tokens generated and kept for groups not yet returned (after the last generate)."""
    return coord.rollouts.stats.get("kept_tokens", 0)


def run_block(name: str, args, model: str, sampling: Sampling, pipeline, block: int) -> dict:
    """One coordinator: ``warmup`` + ``steps`` GRPO steps; per-step times and figures.

    The prompts start at ``prompt_text(block * PROMPTS_PER_BLOCK)``: a mode's ``j``-th block
    reads the same stretch of the stream as the other mode's ``j``-th block.
    """
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    engine = EngineConfig(
        model=model,
        max_model_len=args.max_len,
        seed=args.seed,
        log_level="ERROR",
    )
    trainer = TrainerConfig(
        model=model,
        zero_stage=3,
        lr=args.lr,
        seed=args.seed,
        max_tokens_per_micro_batch=args.budget,
    )
    coord = Coordinator(spec, engine, trainer, grpo_loss, pipeline=pipeline)
    partial = pipeline.mode.value == "partial"
    next_prompt = block * PROMPTS_PER_BLOCK
    rows = []
    try:
        t0 = time.perf_counter()
        coord.start()
        start_s = time.perf_counter() - t0
        for i in range(args.warmup + args.steps):
            held_before = held_tokens(coord)
            t0 = time.perf_counter()
            if partial:
                take = coord.rollouts.wanted()
                prompts = [prompt_text(next_prompt + k) for k in range(take)]
                comps = coord.generate(prompts, sampling, groups=args.groups)
            else:
                take = args.groups
                prompts = [prompt_text(next_prompt + k) for k in range(take)]
                comps = coord.generate(prompts, sampling)
            next_prompt += take
            t1 = time.perf_counter()
            rewards = [reward(c.token_ids) for c in comps]
            batch = make_grpo_batch(comps, rewards, args.n, 0)
            t2 = time.perf_counter()
            stats = coord.train(batch)
            t3 = time.perf_counter()
            coord.sync()
            t4 = time.perf_counter()
            lengths = [len(c.token_ids) for c in comps]
            row = {
                "timed": i >= args.warmup,
                "prompts_passed": take,
                "groups": len(comps) // args.n,
                "generate_s": t1 - t0,
                "score_s": t2 - t1,
                "train_s": t3 - t2,
                "sync_s": t4 - t3,
                "wall_s": t4 - t0,
                "tokens": sum(lengths),
                "held_before": held_before,
                "held_after": held_tokens(coord),
                "lengths": lengths,
                "loss": stats["loss"],
            }
            if partial:
                row["rollout"] = dict(coord.rollouts.stats)
            rows.append(row)
            print(
                f"  {name:8s} block {block} step {i}{'' if row['timed'] else ' (warm-up)'}: "
                f"gen {row['generate_s']:.2f} s, train {row['train_s']:.2f} s, "
                f"sync {row['sync_s']:.2f} s, {row['tokens']} tokens, longest {max(lengths)}, "
                f"median {statistics.median(lengths)}"
                + (
                    f", rounds {row['rollout']['rounds']}, partial "
                    f"{row['rollout']['partial_fraction']:.2f}, stale "
                    f"{row['rollout']['max_staleness']}"
                    if partial
                    else ""
                )
            )
    finally:
        coord.shutdown()  # collects every actor's spans into the timeline
    if next_prompt >= (block + 1) * PROMPTS_PER_BLOCK:
        raise SystemExit("a block read past its stretch of the prompt stream; fewer steps")
    timed = [r for r in rows if r["timed"]]
    return {
        "rows": rows,
        "start_s": start_s,
        "violations": coord.timeline.ordering_violations(),
        # tokens generated in the timed window but not trained on (partial: kept in flight)
        "held_delta": timed[-1]["held_after"] - timed[0]["held_before"],
        # cumulative over the coordinator's run: its last generate's count covers all
        "dropped": rows[-1]["rollout"]["dropped"] if partial else 0,
        "dropped_by_reason": rows[-1]["rollout"]["dropped_by_reason"] if partial else {},
    }


def summarize(blocks: list[dict], partial: bool) -> dict:
    """A mode's timed-step totals over its blocks, per-phase seconds and length figures."""
    rows = [r for b in blocks for r in b["rows"]]
    violations = [v for b in blocks for v in b["violations"]]
    timed = [r for r in rows if r["timed"]]
    wall = sum(r["wall_s"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    generated = tokens + sum(b["held_delta"] for b in blocks)
    lengths = [n for r in timed for n in r["lengths"]]
    out = {
        "start_s": [b["start_s"] for b in blocks],
        "blocks": len(blocks),
        "steps_timed": len(timed),
        "wall_s": wall,
        **{k: sum(r[k] for r in timed) for k in ("generate_s", "score_s", "train_s", "sync_s")},
        "generate_share": sum(r["generate_s"] for r in timed) / wall,
        "trained_tokens": tokens,
        "generated_tokens": generated,
        "tokens_per_s": tokens / wall,
        "generated_tokens_per_s": generated / wall,
        "lengths": {
            "completions": len(lengths),
            "mean": statistics.fmean(lengths),
            "median": statistics.median(lengths),
            "p90": sorted(lengths)[int(0.9 * (len(lengths) - 1))],
            "max": max(lengths),
            "min": min(lengths),
            "longest_over_median_per_step": statistics.fmean(
                max(r["lengths"]) / max(1, statistics.median(r["lengths"])) for r in timed
            ),
        },
        "ordering_violations": len(violations),
        "ordering_violation_text": violations[:5],
        "steps": [{k: v for k, v in r.items() if k != "lengths"} for r in rows],
    }
    if partial:
        stats = [r["rollout"] for r in timed]
        hist: Counter = Counter()
        for s in stats:
            hist.update({int(k): v for k, v in s["staleness_histogram"].items()})
        out.update(
            {
                "max_staleness": max(s["max_staleness"] for s in stats),
                "partial_fraction": statistics.fmean(s["partial_fraction"] for s in stats),
                "spans_per_completion": statistics.fmean(s["spans_per_completion"] for s in stats),
                "staleness_histogram": dict(sorted(hist.items())),
                "dropped": sum(b["dropped"] for b in blocks),
                "dropped_by_reason": dict(
                    sum((Counter(b["dropped_by_reason"]) for b in blocks), Counter())
                ),
                "rounds": sum(s["rounds"] for s in stats),
            }
        )
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    args.max_len = 64 + args.max_tokens  # prompts are ~10 tokens
    if args.budget is None:
        args.budget = 4 * args.max_len
    spec = model_spec(args, args.max_len)
    model = str(build_tiny_model(spec))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = len(tokenizer)
    stop_ids = list(range(3, 3 + args.stop_ids))
    # Token ids only, in both modes: GRPO reads no text, and the partial mode never
    # detokenizes, so the sync baseline does not either (a competent user's setting).
    extra = {"stop_token_ids": stop_ids, "detokenize": False}
    sampling = Sampling(n=args.n, max_tokens=args.max_tokens, temperature=1.0, extra=extra)
    stop_p = (len(stop_ids) + 1) / vocab
    connect(logical_gpus=2, num_cpus=2)
    pipelines = {
        "sync": PipelineConfig(),
        "partial": PipelineConfig(
            mode="partial",
            in_flight_groups=args.in_flight,
            max_staleness=args.max_staleness,
            staleness_policy="wait",
        ),
    }
    order = block_order(args.repeats)
    blocks: dict[str, list[dict]] = {name: [] for name in pipelines}
    try:
        for name in order:
            block = len(blocks[name])
            blocks[name].append(run_block(name, args, model, sampling, pipelines[name], block))
    finally:
        ray.shutdown()
    runs = {name: summarize(blocks[name], name == "partial") for name in pipelines}
    sync, part = runs["sync"], runs["partial"]
    speedup = part["tokens_per_s"] / sync["tokens_per_s"]
    violations = sync["ordering_violations"] + part["ordering_violations"]
    results = {
        "tokens_per_s_sync": sync["tokens_per_s"],
        "tokens_per_s_partial": part["tokens_per_s"],
        "speedup": speedup,
        "generated_tokens_per_s_sync": sync["generated_tokens_per_s"],
        "generated_tokens_per_s_partial": part["generated_tokens_per_s"],
        "generated_speedup": part["generated_tokens_per_s"] / sync["generated_tokens_per_s"],
        "max_staleness": part["max_staleness"],
        "partial_fraction": part["partial_fraction"],
        "staleness_histogram": part["staleness_histogram"],
        "dropped": part["dropped"],
        "rounds": part["rounds"],
        "ordering_violations": violations,
        "trained_tokens": {name: run["trained_tokens"] for name, run in runs.items()},
        "completion_lengths": {
            name: {k: run["lengths"][k] for k in ("mean", "median", "max")}
            for name, run in runs.items()
        },
        "steps": {name: run["steps_timed"] for name, run in runs.items()},
        "B": args.groups,
        "n": args.n,
        "K": args.in_flight,
        "phase_s": {
            name: {k: run[k] for k in ("generate_s", "score_s", "train_s", "sync_s", "wall_s")}
            for name, run in runs.items()
        },
        "speedup_target": TARGET_SPEEDUP,
        "max_staleness_target": TARGET_MAX_STALENESS,
        "speedup_pass": speedup >= TARGET_SPEEDUP,
        "max_staleness_pass": part["max_staleness"] <= TARGET_MAX_STALENESS,
        "ordering_pass": violations == 0,
        "dropped_pass": part["dropped"] == 0,
    }
    results["pass"] = all(
        results[k] for k in ("speedup_pass", "max_staleness_pass", "ordering_pass", "dropped_pass")
    )
    results.update(
        {
            "workload": {
                "name": "geometric completion lengths capped at max_tokens",
                "description": (
                    f"temperature-1 sampling from an untrained model (near-uniform tokens); "
                    f"{len(stop_ids)} stop token ids (ids 3..{stop_ids[-1]}) + EOS of "
                    f"{vocab}: length ~ Geometric(p ~ {stop_p:.4f}, mean ~ {1 / stop_p:.0f}) "
                    f"capped at {args.max_tokens}"
                ),
                "stop_token_ids": len(stop_ids),
                "vocab": vocab,
                "stop_probability": stop_p,
                "expected_mean_uncapped": 1 / stop_p,
                "max_tokens": args.max_tokens,
                "lengths": {name: run["lengths"] for name, run in runs.items()},
                "prompts": (
                    "one deterministic stream prompt_text(0), prompt_text(1), ...; sync takes B "
                    "per step, partial takes rollouts.wanted() per step from the same stream"
                ),
            },
            "runs": runs,
            "config": {
                "topology": (
                    "1 node, 2 logical GPUs, colocated: 2 DeepSpeed ZeRO-3 trainer ranks (fp32,"
                    " gloo) + 2 vLLM CPU engines"
                ),
                "order": block_order(args.repeats),
                "B": args.groups,
                "n": args.n,
                "K": args.in_flight,
                "S": args.max_staleness,
                "staleness_policy": "wait",
                "trainer": f"max_tokens_per_micro_batch={args.budget} (packed), lr={args.lr:g}",
                "model": {
                    "path": model,
                    "hidden_size": args.hidden,
                    "intermediate_size": args.intermediate,
                    "num_hidden_layers": args.layers,
                    "num_attention_heads": args.heads,
                    "max_position_embeddings": max(512, args.max_len),
                    "max_model_len": args.max_len,
                    "vocab": vocab,
                },
                **{k: v for k, v in vars(args).items() if k != "json"},
            },
            "machine": machine(),
            "code": code_version(),
            "runtime_s": time.perf_counter() - started,
        }
    )
    for key in ("tokens_per_s_sync", "tokens_per_s_partial", "speedup", "partial_fraction"):
        print(f"{key} = {results[key]:.4g}")
    for key in ("max_staleness", "dropped", "ordering_violations", "rounds"):
        print(f"{key} = {results[key]}")
    for name, run in runs.items():
        print(
            f"{name}: gen {run['generate_s']:.1f} s, train {run['train_s']:.1f} s, sync "
            f"{run['sync_s']:.1f} s of {run['wall_s']:.1f} s; lengths mean "
            f"{run['lengths']['mean']:.1f}, median {run['lengths']['median']}, max "
            f"{run['lengths']['max']}"
        )
    print(f"pass: {results['pass']}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
