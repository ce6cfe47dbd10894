"""Phase-switch benchmark: where an RL step's time goes, and what the coordinator adds.

A colocated topology (1 node, 2 logical GPUs, 2 DeepSpeed ZeRO-3 trainer ranks, 2 in-process
vLLM engines, each GPU shared by one rank and one engine) runs the GRPO loop of
``examples/grpo_colocated.py`` on the tiny Llama (same task, ``colocate.testing.toy_task``) through
the public API: ``--warmup`` steps, then ``--steps`` measured.

Overhead, defined from the timeline only (nothing is patched): the actors' work is their
timeline spans; a step's wall time is the driver's time inside ``generate``, ``train`` and
``sync`` (the reward and batch building between them are user code, reported apart); its work
is the length of the UNION of the actor spans clipped to those calls (actors run in parallel:
the critical path); its overhead is wall minus work. The coordinator records its own span per
call (one driver wait each: a hand-over, the work after it and the next hand-over are chained
on the actors): each one's overhead is its wall time minus the actor work inside it, and
"driver glue" is the rest. A transition's overhead (the hand-over rows ``train``, ``sync``,
``rollout``, and the transfer with its verification) is the time within it, from its first
actor span's start to its last one's end, when no actor works. A hand-over row is told apart
from the work of the same phase (the train steps, the rollouts) by its spans: the rows move
memory (a release or an acquisition), the work does not.

Keys: ``overhead_fraction`` (median over measured steps of overhead / step time, target <=
0.05: the memory moves count as actor work here, so it says what the coordinator's ordering
adds, not what colocation costs); ``handover_fraction`` (median over measured steps of the
union of every release and acquisition span, ``colocate.operations.timeline.RELEASE_STEPS`` and
``ACQUIRE_STEPS``: engine sleep, wake_weights, wake_kv, trainer offload, offload_params,
reload, role offload/reload, over the step's wall time: what the hand-overs cost, no target);
``max_transition_overhead_s`` (max over measured steps and transitions, the ROLLOUT -> TRAIN
hand-over included, target <= 0.05 s); ``rollout_ratio_vs_bare`` (tokens/s of
``coord.generate`` over 2 bare ``vllm.LLM`` engines set up from the same ``EngineConfig`` with
``llm_kwargs`` and the fleet's engine environment, same prompt halves at once, alternating,
medians; target >= 0.95).

Run: ``.venv/bin/python benchmarks/bench_phase_switch.py --json out.json`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import random
import time

import ray
from common import (
    clipped,
    code_version,
    gc_probe,
    handover_latency,
    machine,
    median,
    union_length,
    verdict,
    write_json,
)

from colocate import (
    ActorId,
    Coordinator,
    EngineActor,
    EngineConfig,
    Sampling,
    TrainerConfig,
    build_tiny_model,
    grpo_loss,
    make_grpo_batch,
)
from colocate.actors.engine import llm_kwargs
from colocate.core.contract import Seat
from colocate.operations.cluster import connect
from colocate.operations.timeline import ACQUIRE_STEPS, RELEASE_STEPS
from colocate.testing.toy_task import TargetTokens
from placement import DeviceKind, TenantKind, TopologySpec

TARGETS = {
    "overhead_fraction": 0.05,
    "max_transition_overhead_s": 0.05,
    "rollout_ratio": 0.95,
    "engine_rss_freed_fraction": 0.9,
}
TRANSITIONS = {
    "train": "train_transition",
    "sync": "sync_handover",
    "rollout": "rollout_handover",
    "score": "score_handover",
}
#: The spans that move memory: every release and acquisition of every tenant kind.
MEMORY_MOVES = RELEASE_STEPS | ACQUIRE_STEPS
OFFLOAD_SPANS = ("trainer.offload", "trainer.offload_params", "trainer.reload")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep-level", type=int, default=1, choices=[1, 2])
    p.add_argument("--repeats", type=int, default=15, help="rollout-comparison repeats")
    p.add_argument("--pings", type=int, default=30, help="round trips for the RPC baseline")
    p.add_argument("--timeout", type=float, default=300.0)
    return p.parse_args(argv)


class BareEngine:
    """A bare ``vllm.LLM`` in a Ray actor, built from the same config as ``EngineActor``."""

    def __init__(self, config: EngineConfig, env: dict[str, str], cuda: bool):
        import os

        os.environ.update(env)
        self.config, self.cuda = config, cuda

    def start(self) -> None:
        import vllm

        self.llm = vllm.LLM(**llm_kwargs(self.config, cuda=self.cuda))

    def generate(self, prompts: list[str], sampling: Sampling) -> int:
        outputs = self.llm.generate(prompts, sampling.to_vllm(), use_tqdm=False)
        return sum(len(c.token_ids) for r in outputs for c in r.outputs)


def run_steps(coord: Coordinator, args, task: TargetTokens, pad_id: int) -> list[dict]:
    rng = random.Random(args.seed)
    sampling = Sampling(n=args.group_size, max_tokens=args.max_tokens, temperature=1.0)
    steps = []
    for i in range(args.warmup + args.steps):
        prompts = task.sample_prompts(rng, args.prompts)
        t0 = time.time()
        completions = coord.generate(prompts, sampling)
        t1 = time.time()
        rewards = [task.reward(c.token_ids) for c in completions]
        batch = make_grpo_batch(completions, rewards, args.group_size, pad_id)
        t2 = time.time()
        stats = coord.train(batch)
        t3 = time.time()
        coord.sync()
        t4 = time.time()
        steps.append(
            {
                "step": i,
                "warmup": i < args.warmup,
                "calls": {"generate": (t0, t1), "train": (t2, t3), "sync": (t3, t4)},
                "user_s": t2 - t1,
                "reward": sum(rewards) / len(rewards),
                "loss": stats["loss"],
                "tokens": sum(len(c.token_ids) for c in completions),
                "transfer_report_s": coord.last_sync.seconds,
            }
        )
        print(
            f"  step {i:2d}{' (warm-up)' if i < args.warmup else '':10s} gen {t1 - t0:.3f} s  "
            f"train {t3 - t2:.3f} s  sync {t4 - t3:.3f} s  reward {steps[-1]['reward']:.3f}",
            flush=True,
        )
    return steps


def step_record(s: dict, actor_spans, coord_spans) -> dict:
    windows = list(s["calls"].values())
    wall = sum(b - a for a, b in windows)
    work = sum(union_length(clipped(actor_spans, a, b)) for a, b in windows)
    inside = [c for c in coord_spans if any(a <= c.start and c.end <= b for a, b in windows)]
    by_op: dict[str, float] = {}
    for c in inside:  # the coordinator's own spans: generate, train, sync (one wait each)
        over = (c.end - c.start) - union_length(clipped(actor_spans, c.start, c.end))
        by_op[c.name] = by_op.get(c.name, 0.0) + over
    mine = [x for x in actor_spans if any(a <= x.start and x.end <= b for a, b in windows)]
    groups: dict[tuple, list] = {}
    for x in mine:  # one group per hand-over or op: the coordinator tags each with its own seq
        groups.setdefault((x.phase, x.seq), []).append(x)
    transitions: dict[str, float] = {}
    for (phase, _), members in groups.items():
        # A transition's overhead: the time within it (first release start .. last
        # acquisition end) when no actor works; the transfer's likewise (send/receive/commit).
        # Only a group that moves memory is a hand-over row: the train steps carry phase
        # "train" too (so do the rollouts "rollout"), and must not stand for the train row.
        key = _transition_key(phase, members)
        if key:
            lo, hi = min(x.start for x in members), max(x.end for x in members)
            over = (hi - lo) - union_length(clipped(mine, lo, hi))
            transitions[key] = transitions.get(key, 0.0) + over
    moves = [x for x in actor_spans if x.name in MEMORY_MOVES]
    handover = sum(union_length(clipped(moves, a, b)) for a, b in windows)
    overhead = wall - work
    by_op["driver glue"] = overhead - sum(by_op.values())
    work_by_span: dict[str, float] = {}
    for sp in actor_spans:
        if any(a <= sp.start and sp.end <= b for a, b in windows):
            work_by_span[sp.name] = work_by_span.get(sp.name, 0.0) + sp.end - sp.start
    return {
        "step": s["step"],
        "warmup": s["warmup"],
        **{f"{k}_s": b - a for k, (a, b) in s["calls"].items()},
        "user_s": s["user_s"],
        "step_s": wall,
        "window": (windows[0][0], windows[-1][1]),
        "work_s": work,
        "overhead_s": overhead,
        "overhead_fraction": overhead / wall,
        "handover_s": handover,
        "handover_fraction": handover / wall,
        "overhead_by_op_s": by_op,
        "transition_overhead_s": transitions,
        "work_by_span_s": work_by_span,
        "reward": s["reward"],
        "loss": s["loss"],
        "tokens": s["tokens"],
        "transfer_report_s": s["transfer_report_s"],
    }


def _transition_key(phase: str, spans) -> str | None:
    """The transition a group of spans (one coordinator tag) stands for, or None for work."""
    if any(x.name in MEMORY_MOVES for x in spans):
        return TRANSITIONS.get(phase, f"{phase}_handover")
    return "transfer" if phase == "sync" else None


def rpc_baseline(coord: Coordinator, pings: int) -> dict:
    """Ray round trips of a no-op (``status``) to one engine and one trainer, and to all four."""
    handles = [coord.fleet.handle(a) for a in coord.fleet.actors]

    def timed(refs_fn, n: int) -> float:
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            ray.get(refs_fn(), timeout=60)
            samples.append(time.perf_counter() - t)
        return median(samples)

    engine = coord.fleet.handle(ActorId(TenantKind.ENGINE, 0))
    trainer = coord.fleet.handle(ActorId(TenantKind.TRAINER, 0))
    return {
        "engine_rtt_s": timed(lambda: [engine.status.remote()], pings),
        "trainer_rtt_s": timed(lambda: [trainer.status.remote()], pings),
        "drain_batched_s": timed(lambda: [h.status.remote() for h in handles], pings // 3),
        "actors": len(handles),
    }


def rollout_comparison(coord: Coordinator, engine: EngineConfig, task, args) -> dict:
    prompts = task.sample_prompts(random.Random(args.seed + 3), 16)
    sampling = Sampling(n=8, max_tokens=32, temperature=1.0, extra={"ignore_eos": True})
    n = coord.spec.engines
    bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
    halves = [prompts[bounds[e] : bounds[e + 1]] for e in range(n)]
    cls = ray.remote(BareEngine).options(
        num_gpus=coord.spec.engine_fraction, num_cpus=coord.spec.actor_cpus
    )
    bare = [
        cls.remote(engine, coord.fleet.engine_env(), coord.device is DeviceKind.CUDA)
        for _ in range(n)
    ]
    t = time.perf_counter()
    ray.get([b.start.remote() for b in bare], timeout=args.timeout)
    bare_startup_s = time.perf_counter() - t

    def one(kind: str) -> dict:
        t0 = time.perf_counter()
        if kind == "coordinator":
            tokens = sum(len(c.token_ids) for c in coord.generate(prompts, sampling))
        else:
            refs = [b.generate.remote(p, sampling) for b, p in zip(bare, halves, strict=True)]
            tokens = sum(ray.get(refs, timeout=args.timeout))
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}

    kinds = ("coordinator", "bare")
    for _ in range(2):  # warm-ups (the second with a hot prefix cache)
        for k in kinds:
            one(k)
    samples: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(args.repeats):
        for k in kinds if rep % 2 == 0 else kinds[::-1]:
            samples[k].append(one(k))
    for b in bare:
        ray.kill(b, no_restart=True)
    med = {k: median(x["tokens_per_s"] for x in v) for k, v in samples.items()}
    paired = [c["tokens_per_s"] / b["tokens_per_s"] for c, b in zip(*samples.values(), strict=True)]
    return {
        "prompts": len(prompts),
        "n": sampling.n,
        "max_tokens": sampling.max_tokens,
        "ignore_eos": True,
        "split": [len(h) for h in halves],
        "repeats": args.repeats,
        "bare_startup_s": bare_startup_s,
        "tokens_per_call": {k: v[0]["tokens"] for k, v in samples.items()},
        "median_tokens_per_s": med,
        "median_wall_s": {k: median(x["wall_s"] for x in v) for k, v in samples.items()},
        "ratio": med["coordinator"] / med["bare"],
        "paired_ratios": paired,
        "paired_ratio_median": median(paired),
        "samples": samples,
    }


def sleep_effect(args) -> dict:
    """What an engine's sleep really frees (process RSS on CPU), at levels 1 and 2.

    One engine actor on the weight-sync benchmark's 216 MB model with a 512 MiB KV cache:
    freed RSS (awake minus asleep, the engine's own process tree) over the bytes the sleep
    released (computed from the tensors), and the sleep and wake times from its spans.
    """
    from common import MODEL_SPEC

    config = EngineConfig(model=str(build_tiny_model(MODEL_SPEC)), kv_cache_bytes=512 << 20)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    seat = Seat("e", 0, 1, (0,), config, env)
    engine = ray.remote(EngineActor).options(num_gpus=0.5, num_cpus=0.1).remote(seat)
    out = {}
    try:
        ray.get(engine.start.remote(), timeout=args.timeout)
        ray.get(engine.generate.remote(["kato rimu"], Sampling(max_tokens=8)), timeout=args.timeout)
        for level in (1, 2):  # level 2 last: its weights stay released (nothing syncs them)
            awake = ray.get(engine.status.remote(), timeout=60)["rss_tree_bytes"]
            ray.get(engine.sleep.remote(level), timeout=args.timeout)
            status = ray.get(engine.status.remote(), timeout=60)
            ray.get(engine.wake_kv.remote(), timeout=args.timeout)
            spans = {s.name: s.seconds for s in ray.get(engine.drain_spans.remote(), timeout=60)}
            released = status["released"]
            out[f"level{level}"] = {
                "freed_rss_bytes": awake - status["rss_tree_bytes"],
                "released": released,
                "freed_fraction": (awake - status["rss_tree_bytes"]) / released["total_bytes"],
                "sleep_s": spans["engine.sleep"],
                "wake_s": spans["engine.wake_kv"],
            }
    finally:
        ray.kill(engine)
    out["engine_rss_freed_fraction"] = min(v["freed_fraction"] for v in out.values())
    out["memory_kind"] = "process RSS (CPU): the engine's process tree"
    return out


def summarise(per_step, spans, coord_spans, rpc, rollout) -> dict:
    measured = [r for r in per_step if not r["warmup"]]
    worst = max(
        ((r["step"], k, v) for r in measured for k, v in r["transition_overhead_s"].items()),
        key=lambda x: x[2],
    )
    ops = sorted({op for r in measured for op in r["overhead_by_op_s"]})
    by_op = {op: median(r["overhead_by_op_s"].get(op, 0.0) for r in measured) for op in ops}
    names = sorted({n for r in measured for n in r["work_by_span_s"]})
    segments = {
        k: {
            "overhead_s": median(r["transition_overhead_s"].get(k, 0.0) for r in measured),
            "overhead_max_s": max(r["transition_overhead_s"].get(k, 0.0) for r in measured),
        }
        for k in sorted(
            {"train_transition", "sync_handover", "rollout_handover", "transfer"}
            | {k for r in measured for k in r["transition_overhead_s"]}
        )
    }
    lo, hi = measured[0]["window"][0], measured[-1]["window"][1]
    drains = [
        c.end - c.start for c in coord_spans if c.name == "collect_spans" and lo <= c.start < hi
    ]
    overhead = median(r["overhead_s"] for r in measured)
    offload = median(sum(r["work_by_span_s"].get(n, 0.0) for n in OFFLOAD_SPANS) for r in measured)
    step = median(r["step_s"] for r in measured)
    without_drain = overhead - by_op.get("collect_spans", 0.0) + rpc["drain_batched_s"]
    return {
        "overhead_fraction": median(r["overhead_fraction"] for r in measured),
        "handover_fraction": median(r["handover_fraction"] for r in measured),
        "max_transition_overhead_s": worst[2],
        "rollout_ratio_vs_bare": rollout["ratio"],
        "max_transition_overhead_at": {"step": worst[0], "transition": worst[1]},
        "medians": {
            **{
                f"{k}_s": median(r[f"{k}_s"] for r in measured)
                for k in ("generate", "train", "sync")
            },
            "step_s": step,
            "overhead_s": overhead,
            "handover_s": median(r["handover_s"] for r in measured),
            "user_s": median(r["user_s"] for r in measured),
        },
        "segments": segments,
        "step_work_by_span_s": {
            n: median(r["work_by_span_s"].get(n, 0.0) for r in measured) for n in names
        },
        "step_overhead_by_op_s": by_op,
        "handover_latency_s": {
            "sleep->reload": median(handover_latency(spans, "engine.sleep", "trainer.reload")),
            "offload->wake_weights": median(
                handover_latency(spans, "trainer.offload", "engine.wake_weights")
            ),
            "offload_params->wake_kv": median(
                handover_latency(spans, "trainer.offload_params", "engine.wake_kv")
            ),
        },
        "timeline_drain_s": {"median": median(drains), "per_step": len(drains) / len(measured)},
        "what_if": {
            "overhead_fraction_if_trainer_offload_were_free": overhead / (step - offload),
            "overhead_s_if_drains_batched": without_drain,
            "overhead_s_if_one_batched_drain_per_step": without_drain,
            "overhead_fraction_if_one_batched_drain_per_step": without_drain / step,
        },
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    model = str(build_tiny_model())
    connect(logical_gpus=4, num_cpus=2)  # 2 GPUs for the coordinator, 2 for the bare engines
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    task = TargetTokens.make(len(tokenizer), args.seed)
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    engine = EngineConfig(model=model, seed=args.seed, log_level="ERROR")
    trainer = TrainerConfig(model=model, lr=args.lr, zero_stage=args.zero_stage, seed=args.seed)
    coord = Coordinator(spec, engine, trainer, grpo_loss, sleep_level=args.sleep_level)
    try:
        t = time.perf_counter()
        coord.start()
        startup_s = time.perf_counter() - t
        print(f"coordinator started in {startup_s:.1f} s", flush=True)
        steps = run_steps(coord, args, task, tokenizer.pad_token_id)
        rpc = rpc_baseline(coord, args.pings)
        gc_cost = dict(
            zip(
                ("trainer0", "engine0"),
                ray.get(
                    [
                        coord.fleet.handle(ActorId(kind, 0)).__ray_call__.remote(gc_probe, 5)
                        for kind in (TenantKind.TRAINER, TenantKind.ENGINE)
                    ],
                    timeout=args.timeout,
                ),
                strict=True,
            )
        )
        rollout = rollout_comparison(coord, engine, task, args)
        timeline = coord.timeline
        coord.shutdown()  # frees the CPUs and logical GPUs for the sleep measurement
        effect = sleep_effect(args)
        violations = timeline.ordering_violations()
    finally:
        coord.shutdown()
        ray.shutdown()
    spans = [s for s in timeline.spans if s.actor != "coordinator"]
    coord_spans = [s for s in timeline.spans if s.actor == "coordinator"]
    per_step = [step_record(s, spans, coord_spans) for s in steps]
    results = summarise(per_step, spans, coord_spans, rpc, rollout)
    results["engine_rss_freed_fraction"] = effect.pop("engine_rss_freed_fraction")
    results["engine_sleep_effect"] = effect
    results["targets"] = TARGETS
    results["verdicts"] = {
        "overhead_fraction": verdict(results["overhead_fraction"], 0.05, False),
        "max_transition_overhead_s": verdict(results["max_transition_overhead_s"], 0.05, False),
        "rollout_ratio_vs_bare": verdict(results["rollout_ratio_vs_bare"], 0.95, True),
        "engine_rss_freed_fraction": verdict(results["engine_rss_freed_fraction"], 0.9, True),
    }
    results["definitions"] = {"overhead": __doc__.split("Overhead, defined")[1].split("Keys:")[0]}
    results.update(
        rpc_baseline=rpc,
        rollout=rollout,
        steps=per_step,
        gc_probe=gc_cost,
        config={
            "topology": "1 node, 2 logical GPUs, 2 ZeRO trainer ranks + 2 engines, colocated",
            **{k: v for k, v in vars(args).items() if k != "json"},
            "memory_effect": "CPU: process RSS only (docs/design.md)",
        },
        coordinator_startup_s=startup_s,
        ordering_violations=violations,
        machine=machine(),
        code=code_version(),
        runtime_s=time.perf_counter() - started,
    )
    print_report(results)
    write_json(args.json, results)
    return results


def print_report(r: dict) -> None:
    m = r["medians"]
    print(
        f"\nstep {m['step_s'] * 1e3:.0f} ms (generate {m['generate_s'] * 1e3:.0f}, train "
        f"{m['train_s'] * 1e3:.0f}, sync {m['sync_s'] * 1e3:.0f}); coordinator overhead "
        f"{m['overhead_s'] * 1e3:.1f} ms; hand-overs {m['handover_s'] * 1e3:.1f} ms "
        f"(handover_fraction {r['handover_fraction']:.3f})"
    )
    for key, seg in r["segments"].items():
        print(
            f"  transition {key:20s} overhead median {seg['overhead_s'] * 1e3:6.2f} ms, "
            f"max {seg['overhead_max_s'] * 1e3:6.2f} ms"
        )
    for op, v in sorted(r["step_overhead_by_op_s"].items(), key=lambda x: -x[1]):
        print(f"  {op:28s} {v * 1e3:7.2f} ms")
    for level, e in r["engine_sleep_effect"].items():
        if isinstance(e, dict):
            print(f"  sleep {level}: freed {e['freed_fraction']:.3f}, {e['sleep_s']:.3f} s")
    for key in r["verdicts"]:
        print(f"{key} = {r[key]:.4f}: {r['verdicts'][key]}")


if __name__ == "__main__":
    main()
