"""Packed sequences vs padded rows: one long-tailed GRPO batch trained both ways, same ranks.

One GRPO-shaped batch (``--rows`` right-padded rows: ``input_ids``, ``attention_mask``,
``completion_mask``, ``old_logprobs``, ``advantages`` [B]) whose lengths are long-tailed: each
row is a prompt of ``U{prompt_min..prompt_max}`` tokens and a completion drawn from a lognormal
(``--median-completion``, ``--sigma``; rounded, at least 1, capped at the maximum), except
``--long-rows`` rows whose completions stop at the maximum (``--max-len`` tokens in all: the
completions that hit ``max_tokens``). The rows are shuffled; the batch is padded to its longest
row, as a rollout batch is. The JSON's ``distribution`` states the parameters and the realised
lengths (mean, median, max, real tokens, padded tokens).

Two coordinators, one after the other, in one process: the same topology (2 logical GPUs,
colocated: 2 DeepSpeed ZeRO-3 trainer ranks and 2 vLLM engines), the same model, seeds and
optimizer (``--lr``, AdamW ``eps`` 1, no gradient clipping: an update is ~ lr x gradient, so a
wrongly weighted step shows), and the same batch:

- padded: ``micro_batch_size=None``, each rank's whole shard (half the rows, padded to the
  batch's longest row) in one forward/backward: the fastest padded configuration on CPU (fewest
  ZeRO-3 gathers, largest matrix products);
- packed: ``max_tokens_per_micro_batch=--budget`` (default twice ``--max-len``): each rank's
  shard of near-equal tokens in packed rows of at most that many tokens.

A third coordinator (on by default, ``--no-matched`` skips it), reported but not the headline:
padded with ``micro_batch_size`` = ``budget // max_len`` rows, the padded configuration with
the same activation bound as the budget (``train_s_padded_matched``,
``speedup_vs_padded_matched`` = ``train_s_padded_matched / train_s_packed``).

Each coordinator's first ``train`` is the equality step (it also pays the train row's
hand-over, so it is never timed): right after it ``Coordinator.export_hf`` writes its weights
in the engine dtype, float32. ``max_abs_diff`` is max |padded - packed| over every tensor;
``max_abs_update`` is max |padded - start| (the scale the diff is read against). Then
``--steps`` timed ``train`` calls on the same batch (each an optimizer step; the driver's wall
time around ``Coordinator.train``).

Keys: ``train_s_padded`` and ``train_s_packed`` (medians of the timed steps; ``steps`` has
each step's), ``speedup`` = ``train_s_padded / train_s_packed`` (target >= 2 on the 2-core build
machine), ``padding_fraction_padded`` / ``padding_fraction_packed`` (as the train steps report
it: the share of the tokens the forwards computed that were padding, the mean over the two
ranks), ``max_abs_diff`` (target <= 1e-5), ``loss_abs_diff`` (first step's loss, padded vs
packed), ``speedup_pass``, ``max_abs_diff_pass`` and ``pass`` (both targets met, from the
measured numbers). For reading the speedup: ``token_ratio`` = padded tokens / real tokens
(the speedup were a step's time proportional to the tokens its forwards compute), and
``rank_train_s_*`` (median over the timed steps of the slowest rank's own
``trainer.train_step`` span: the driver's wall time less the call's way there and back).

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_packing.py --json out.json``
(minutes; not a test).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import add_model_args, code_version, machine, median, model_spec, write_json
from safetensors.torch import load_file

from colocate import (
    Coordinator,
    EngineConfig,
    TrainerConfig,
    build_tiny_model,
    grpo_loss,
)
from colocate.operations.cluster import connect
from placement import TopologySpec

TARGET_SPEEDUP = 2.0
TARGET_MAX_ABS_DIFF = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--rows", type=int, default=64, help="sequences in the batch")
    p.add_argument(
        "--max-len", type=int, default=512, help="longest sequence (prompt + completion)"
    )
    p.add_argument("--long-rows", type=int, default=4, help="rows whose completion hits the max")
    p.add_argument("--median-completion", type=float, default=24.0, help="lognormal median")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma (of log length)")
    p.add_argument("--prompt-min", type=int, default=8)
    p.add_argument("--prompt-max", type=int, default=24)
    p.add_argument("--budget", type=int, help="max_tokens_per_micro_batch (default 2 x max-len)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per mode")
    p.add_argument(
        "--matched",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also padded with micro_batch_size = budget // max-len rows",
    )
    add_model_args(p, hidden=256, intermediate=1024, layers=4)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 2 * args.max_len
    if not 1 <= args.prompt_min <= args.prompt_max < args.max_len:
        p.error("need 1 <= --prompt-min <= --prompt-max < --max-len")
    if not 0 <= args.long_rows <= args.rows:
        p.error("need 0 <= --long-rows <= --rows")
    if args.budget < args.max_len:
        p.error("--budget must be at least --max-len (a sequence at the maximum must fit)")
    return args


def completion_lengths(args: argparse.Namespace, prompts: list[int]) -> list[int]:
    """Each row's completion length: lognormal (capped), the ``long_rows`` first at the max."""
    rng = random.Random(args.seed)
    mu = math.log(args.median_completion)
    out = []
    for i, prompt in enumerate(prompts):
        room = args.max_len - prompt
        drawn = room if i < args.long_rows else round(rng.lognormvariate(mu, args.sigma))
        out.append(min(max(drawn, 1), room))
    return out


def long_tailed_batch(args: argparse.Namespace, vocab: int) -> tuple[dict, dict]:
    """The GRPO batch (rows shuffled) and the statement of its length distribution.

    Deterministic in ``args.seed``. ``old_logprobs`` sit near a uniform policy's
    (-log vocab), so the clipped ratio passes gradient on most tokens; the equality of the
    two modes does not depend on them.
    """
    rng = random.Random(args.seed + 1)
    prompts = [rng.randint(args.prompt_min, args.prompt_max) for _ in range(args.rows)]
    completions = completion_lengths(args, prompts)
    rows = list(zip(prompts, completions, strict=True))
    rng.shuffle(rows)
    lengths = [p + c for p, c in rows]
    width = max(lengths)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.zeros((args.rows, width), dtype=torch.long)
    attention = torch.zeros((args.rows, width), dtype=torch.long)
    completion = torch.zeros((args.rows, width))
    for i, ((prompt, _), n) in enumerate(zip(rows, lengths, strict=True)):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=gen)
        attention[i, :n] = 1
        completion[i, prompt:n] = 1.0
    old = torch.randn((args.rows, width), generator=gen) * 0.1 - math.log(vocab)
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "old_logprobs": old * completion,
        "advantages": torch.randn(args.rows, generator=gen),
    }
    real = sum(lengths)
    distribution = {
        "name": "lognormal completions with a truncated tail",
        "description": (
            f"{args.rows - args.long_rows} rows: prompt ~ U{{{args.prompt_min}..{args.prompt_max}}}"
            f" tokens + completion ~ round(LogNormal(mu=ln {args.median_completion:g}, "
            f"sigma={args.sigma:g})), at least 1, capped so the row fits {args.max_len}; "
            f"{args.long_rows} rows: completions that stop at the maximum ({args.max_len} "
            "tokens in all); rows shuffled, right-padded to the longest"
        ),
        "params": {
            "rows": args.rows,
            "long_rows": args.long_rows,
            "max_len": args.max_len,
            "median_completion": args.median_completion,
            "sigma": args.sigma,
            "prompt_min": args.prompt_min,
            "prompt_max": args.prompt_max,
            "seed": args.seed,
        },
        "lengths": {
            "mean": real / len(lengths),
            "median": statistics.median(lengths),
            "p90": sorted(lengths)[int(0.9 * (len(lengths) - 1))],
            "max": width,
            "min": min(lengths),
            "real_tokens": real,
            "padded_tokens": args.rows * width,
            "padding_fraction": 1.0 - real / (args.rows * width),
            "completion_tokens": int(completion.sum()),
        },
    }
    return batch, distribution


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors files, by name, in float32."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(shard)).items()})
    return out


def run_mode(name, args, model, batch, out_dir: Path, **trainer_fields) -> dict:
    """One coordinator: the equality step and its export, then the timed steps."""
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    engine = EngineConfig(
        model=model,
        dtype="float32",  # the export's dtype: a float32 diff can be read at 1e-5
        max_model_len=args.max_len,
        seed=args.seed,
        log_level="ERROR",
    )
    trainer = TrainerConfig(
        model=model,
        zero_stage=3,
        lr=args.lr,
        grad_clip=0.0,
        seed=args.seed,
        # eps=1: the first AdamW update is ~ lr x gradient, not ~ lr x sign(gradient).
        ds_config={"optimizer": {"params": {"eps": 1.0}}},
        **trainer_fields,
    )
    coord = Coordinator(spec, engine, trainer, grpo_loss)
    rows = []
    try:
        t0 = time.perf_counter()
        coord.start()
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = coord.train(batch)
        first_s = time.perf_counter() - t0
        coord.export_hf(str(out_dir / name))
        for i in range(args.steps):
            t0 = time.perf_counter()
            stats = coord.train(batch)
            rows.append({"train_s": time.perf_counter() - t0, **stats})
            print(f"  {name:14s} step {i}: {rows[-1]['train_s']:.2f} s, loss {stats['loss']:.4f}")
    finally:
        coord.shutdown()  # collects every actor's spans into the timeline
    # The slowest rank's own train step (its span), per step: the rest of the driver's wall
    # time is the call's way there and back.
    per_step: dict[int, float] = {}
    for s in coord.timeline.spans:
        if s.name == "trainer.train_step":
            per_step[s.step] = max(per_step.get(s.step, 0.0), s.seconds)
    rank_s = [per_step[k] for k in sorted(per_step)]
    if len(rank_s) == len(rows) + 1:  # the equality step first
        for row, seconds in zip(rows, rank_s[1:], strict=True):
            row["rank_train_s"] = seconds
    return {
        "trainer": dict(trainer_fields),
        "start_s": start_s,
        "first_step_s": first_s,
        "first_step": first,
        "train_s": median(r["train_s"] for r in rows),
        "rank_train_s": median(r.get("rank_train_s", math.nan) for r in rows),
        "steps": rows,
        "padding_fraction": first["padding_fraction"],
        "micro_batches": first["micro_batches"],
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = model_spec(args, args.max_len)
    model = build_tiny_model(spec)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(model)))
    batch, distribution = long_tailed_batch(args, vocab)
    lengths = distribution["lengths"]
    print(
        f"batch: {args.rows} rows, lengths mean {lengths['mean']:.1f}, median "
        f"{lengths['median']}, max {lengths['max']}; {lengths['real_tokens']} real of "
        f"{lengths['padded_tokens']} padded tokens"
    )
    connect(logical_gpus=2, num_cpus=2)
    modes = {
        "padded": {"micro_batch_size": None},
        "packed": {"max_tokens_per_micro_batch": args.budget},
    }
    if args.matched:
        modes["padded_matched"] = {"micro_batch_size": max(1, args.budget // args.max_len)}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        try:
            for name, fields in modes.items():
                runs[name] = run_mode(name, args, str(model), batch, Path(tmp), **fields)
        finally:
            ray.shutdown()
        start = load_weights(Path(model))
        exported = {name: load_weights(Path(tmp) / name) for name in modes}
    padded, packed = exported["padded"], exported["packed"]
    if set(padded) != set(packed) or set(padded) != set(start):
        raise SystemExit("the exports hold different tensors: nothing to compare")
    max_abs_diff = max((padded[k] - packed[k]).abs().max().item() for k in padded)
    max_abs_update = max((padded[k] - start[k]).abs().max().item() for k in padded)
    speedup = runs["padded"]["train_s"] / runs["packed"]["train_s"]
    results = {
        "train_s_padded": runs["padded"]["train_s"],
        "train_s_packed": runs["packed"]["train_s"],
        "speedup": speedup,
        # padded over real tokens: the speedup were a step's time proportional to its tokens
        "token_ratio": distribution["lengths"]["padded_tokens"]
        / distribution["lengths"]["real_tokens"],
        "rank_train_s_padded": runs["padded"]["rank_train_s"],
        "rank_train_s_packed": runs["packed"]["rank_train_s"],
        "padding_fraction_padded": runs["padded"]["padding_fraction"],
        "padding_fraction_packed": runs["packed"]["padding_fraction"],
        "max_abs_diff": max_abs_diff,
        "max_abs_update": max_abs_update,
        "loss_abs_diff": abs(
            runs["padded"]["first_step"]["loss"] - runs["packed"]["first_step"]["loss"]
        ),
        "micro_batches_padded": runs["padded"]["micro_batches"],
        "micro_batches_packed": runs["packed"]["micro_batches"],
        "speedup_target": TARGET_SPEEDUP,
        "max_abs_diff_target": TARGET_MAX_ABS_DIFF,
        "speedup_pass": speedup >= TARGET_SPEEDUP,
        "max_abs_diff_pass": max_abs_diff <= TARGET_MAX_ABS_DIFF,
    }
    results["pass"] = results["speedup_pass"] and results["max_abs_diff_pass"]
    if args.matched:
        matched = runs["padded_matched"]
        results["train_s_padded_matched"] = matched["train_s"]
        results["padding_fraction_padded_matched"] = matched["padding_fraction"]
        results["micro_batches_padded_matched"] = matched["micro_batches"]
        results["speedup_vs_padded_matched"] = matched["train_s"] / runs["packed"]["train_s"]
        results["max_abs_diff_padded_matched"] = max(
            (exported["padded_matched"][k] - packed[k]).abs().max().item() for k in packed
        )
    results.update(
        {
            "distribution": distribution,
            "runs": runs,
            "config": {
                "topology": (
                    "1 node, 2 logical GPUs, colocated: 2 DeepSpeed ZeRO-3 trainer ranks (fp32,"
                    " gloo) + 2 vLLM CPU engines (float32)"
                ),
                "padded": "micro_batch_size=None: each rank's whole shard in one forward",
                "packed": f"max_tokens_per_micro_batch={args.budget}",
                "optimizer": f"AdamW lr={args.lr:g} eps=1 betas=(0.9, 0.999), grad_clip=0",
                "model": {
                    "path": str(model),
                    "spec": {
                        k: getattr(spec, k)
                        for k in (
                            "hidden_size",
                            "intermediate_size",
                            "num_hidden_layers",
                            "num_attention_heads",
                            "num_key_value_heads",
                            "max_position_embeddings",
                        )
                    },
                    "parameters": sum(t.numel() for t in start.values()),
                    "vocab": vocab,
                },
                **{k: v for k, v in vars(args).items() if k != "json"},
            },
            "machine": machine(),
            "code": code_version(),
            "runtime_s": time.perf_counter() - started,
        }
    )
    for key in (
        "train_s_padded",
        "train_s_packed",
        "speedup",
        "padding_fraction_padded",
        "padding_fraction_packed",
        "max_abs_diff",
        "max_abs_update",
    ):
        print(f"{key} = {results[key]:.4g}")
    print(f"pass: {results['pass']}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
