"""Phase-switch benchmark on CPU: where an RL step's time goes, and what the coordinator adds.

A colocated topology (1 node, 2 logical GPUs, 2 DeepSpeed ZeRO-3 trainer ranks, 2 in-process
vLLM engines, each GPU shared by one rank and one engine) runs a GRPO loop on the tiny Llama of
``colocate.tiny_model`` through the public API (``Coordinator.generate`` / ``train`` /
``sync``), as ``examples/grpo_colocated.py`` does: ``--warmup`` steps, then ``--steps`` measured.

Overhead, defined. Every coordinator call of a step is cut, on the driver (``time.time()``),
into contiguous segments; four of them are the transitions:

- ``generate``: ``coord.generate`` (the generate RPCs to both engines; a timeline drain where
  the coordinator does one there).
- ``train_transition`` (ROLLOUT -> TRAIN): from ``coord.train`` entry to the end of
  ``Coordinator._transition`` (engines sleep, then trainers reload; then the timeline drain).
- ``train_step``: the rest of ``coord.train`` (train_step RPCs, timeline drain).
- ``sync_handover`` (TRAIN -> SYNC): from ``coord.sync`` entry to the start of the transfer
  (trainers offload grads/optimizer, then engines wake weights).
- ``transfer``: ``Coordinator._transfer``, or ``SyncDriver.transfer`` where the coordinator
  delegates it (send/receive of every bucket, fingerprint compare, applied-fingerprints RPC).
- ``rollout_handover`` (SYNC -> ROLLOUT): from the end of the transfer to the return of
  ``coord.sync`` (trainers offload params, then engines wake the KV cache; the commit_version
  RPC; the timeline drain).

The actors' own work is their timeline spans (``coord.timeline.spans``: wall-clock
``time.time()`` in each actor process, all on this one machine). A segment's work is the
length of the UNION of the span intervals clipped to it (actors run in parallel: the critical
path, not the sum); its overhead is its wall time minus that work. Overhead is then split into
lead (segment start to the first span), gaps (between spans, e.g. a release's end to the
acquisition's start) and tail (last span's end to the segment's end), and by driver operation
(each ``handover`` / ``wait_all`` / timeline drain inside the segment, timed by wrapping them
here; "glue" is driver Python between them). Step time = generate + train + sync wall time
(the reward and batch building between them are user code, reported apart).

Keys: ``overhead_fraction`` = median over measured steps of (sum of the six segments' overhead
/ step time), target <= 0.05; ``max_transition_overhead_s`` = max over measured steps and the
four transitions of the overhead, target <= 0.05 s; ``rollout_ratio_vs_bare`` = tokens/s of
``coord.generate`` over tokens/s of two bare ``vllm.LLM`` engines (see below), target >= 0.95.

Rollout comparison. ``coord.generate`` splits the prompts over its 2 engine actors, which run
concurrently; the fair bare baseline is therefore 2 bare ``vllm.LLM`` engines, each in a Ray
actor set up like ``EngineActor`` (same ``EngineConfig`` fields, the coordinator's own engine
environment: in-process engine core, same ``num_gpus``/``num_cpus``), given the same halves of
the prompts at once, calling ``llm.generate`` directly and returning the generated token ids.
Same prompts, same ``SamplingParams`` (``ignore_eos`` so both generate exactly the same number
of tokens). Kinds alternate (order flipped every repeat; never two at once), ``--repeats``
repeats after two warm-ups each (the second with a hot prefix cache); tokens / driver wall
seconds, medians. A diagnostic third kind calls the 2 engine actors directly
(``EngineActor.generate``), bypassing the coordinator.

Run: ``.venv/bin/python benchmarks/phase_switch.py --json out.json`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

# Run as a script, this folder leads sys.path (and Ray copies the driver's path to its workers):
# keep it off, or sibling benchmarks named like the packages they measure (weight_sync.py,
# placement.py) would shadow those packages.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read by DeepSpeed's import in this process

import ray  # noqa: E402

from colocate import (  # noqa: E402
    Coordinator,
    EngineConfig,
    Sampling,
    TrainerConfig,
    build_tiny_model,
    grpo_loss,
    make_grpo_batch,
)
from colocate.tiny_model import synthetic_corpus  # noqa: E402
from placement import TopologySpec  # noqa: E402

TARGETS = {
    "overhead_fraction": 0.05,
    "max_transition_overhead_s": 0.05,
    "rollout_ratio_vs_bare": 0.95,
}
SEGMENTS = (
    "generate",
    "train_transition",
    "train_step",
    "sync_handover",
    "transfer",
    "rollout_handover",
)
TRANSITIONS = ("train_transition", "sync_handover", "transfer", "rollout_handover")
RATIO_KINDS = ("coordinator", "bare", "engine_actors_direct")
TARGET_TOKENS = 10
DEFINITIONS = {
    "segments": (
        "contiguous driver-side (time.time()) cuts of each step: generate = coord.generate; "
        "train_transition = coord.train entry -> end of Coordinator._transition (sleep/reload "
        "hand-over + timeline drain); train_step = rest of coord.train; sync_handover = "
        "coord.sync entry -> start of the transfer; transfer = Coordinator._transfer (or "
        "SyncDriver.transfer where the coordinator delegates it: send/receive, fingerprint "
        "compare, applied-fingerprints RPC); rollout_handover = end of the transfer -> return "
        "of coord.sync (offload_params/wake_kv "
        "hand-over, commit_version RPC, timeline drain)"
    ),
    "work": (
        "length of the union of the actors' timeline spans (time.time() in each actor process, "
        "one machine) clipped to the segment: the critical path of parallel actor work"
    ),
    "overhead": "segment wall time minus work; lead + gaps + tail",
    "step_s": "generate_s + train_s + sync_s (user code between them reported as user_s)",
    "overhead_fraction": "median over measured steps of sum(segment overheads) / step_s",
    "max_transition_overhead_s": (
        "max over measured steps and the transitions train_transition, sync_handover, "
        "transfer, rollout_handover of the overhead"
    ),
    "rollout_ratio_vs_bare": (
        "median tokens/s of coord.generate (2 engine actors) / median tokens/s of 2 bare "
        "vllm.LLM actors given the same prompt halves at once; tokens counted on the driver, "
        "wall seconds on the driver; alternating, one at a time"
    ),
}


# ----- driver-side timing -----------------------------------------------------------------------


class DriverLog:
    """Intervals of the coordinator's driver-side operations (``time.time()``)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    @contextlib.contextmanager
    def interval(self, label: str, leaf: bool = False):
        """Records the block as one event."""
        start = time.time()
        try:
            yield
        finally:
            self.events.append({"label": label, "start": start, "end": time.time(), "leaf": leaf})

    def between(self, start: float, end: float, leaf: bool | None = None) -> list[dict]:
        """Events that lie inside ``[start, end]``."""
        return [
            e
            for e in self.events
            if e["start"] >= start and e["end"] <= end and (leaf is None or e["leaf"] is leaf)
        ]


def _methods(calls) -> str:
    return "+".join(sorted({c.method for c in calls})) or "-"


def _timed(log: DriverLog, fn, label, leaf: bool):
    def wrapper(*args, **kwargs):
        name = label(args) if callable(label) else label
        with log.interval(name, leaf=leaf):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def instrument(log: DriverLog):
    """Times, on the driver, the coordinator's transitions, transfer, drains and dispatches.

    Wraps (for the duration of the block, in this process only; nothing in ``colocate`` is
    edited): ``Coordinator._transition``, ``Coordinator._collect_spans``, the transfer
    (``Coordinator._transfer``, or ``SyncDriver.transfer`` where the coordinator delegates
    it), and the ``wait_all`` / ``handover`` names the coordinator's modules call.
    """
    import importlib

    patches = [
        (
            Coordinator,
            "_transition",
            _timed(
                log,
                Coordinator._transition,
                lambda a: f"transition[{getattr(a[1], 'value', a[1])}]",
                False,
            ),
        ),
        (
            Coordinator,
            "_collect_spans",
            _timed(log, Coordinator._collect_spans, "collect_spans", True),
        ),
    ]
    if hasattr(Coordinator, "_transfer"):
        patches.append(
            (Coordinator, "_transfer", _timed(log, Coordinator._transfer, "transfer", False))
        )
    else:
        driver = importlib.import_module("colocate.syncing").SyncDriver
        patches.append((driver, "transfer", _timed(log, driver.transfer, "transfer", False)))
    for name in ("colocate.coordinator", "colocate.syncing"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "wait_all"):
            label = lambda a: f"wait_all[{_methods(a[0])}]"  # noqa: E731
            patches.append((module, "wait_all", _timed(log, module.wait_all, label, True)))
        if hasattr(module, "handover"):
            label = lambda a: f"handover[{_methods(a[0])}->{_methods(a[1])}]"  # noqa: E731
            patches.append((module, "handover", _timed(log, module.handover, label, True)))
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in patches]
    for owner, attr, fn in patches:
        setattr(owner, attr, fn)
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def _actors(coord: Coordinator) -> tuple[list, list]:
    """Engine and trainer handles (held by the coordinator, or by its fleet)."""
    fleet = getattr(coord, "fleet", None)
    holder = fleet if fleet is not None else coord
    return list(holder.engines), list(holder.trainers)


def _engine_env(coord: Coordinator) -> dict[str, str]:
    """The environment the coordinator gives its engine actors."""
    fleet = getattr(coord, "fleet", None)
    return (fleet if fleet is not None else coord)._engine_env()


# ----- the bare baseline ------------------------------------------------------------------------


class BareEngine:
    """A plain ``vllm.LLM`` in a Ray actor, built from the same fields as ``EngineActor``."""

    def __init__(self, config: EngineConfig, env: dict[str, str]):
        os.environ.update(env)
        warnings.filterwarnings("ignore", category=FutureWarning)
        self.config = config
        self.llm = None

    def start(self) -> None:
        """Builds the engine with the arguments ``EngineActor`` uses, minus the sync extension."""
        import vllm

        from colocate.engine import llm_kwargs

        self.llm = vllm.LLM(**llm_kwargs(self.config, cuda=False))

    def generate(self, prompts: list[str], sampling: Sampling) -> dict:
        """``llm.generate`` directly; returns the generated token ids and its own timing."""
        start = time.time()
        outputs = self.llm.generate(prompts, sampling.to_vllm(), use_tqdm=False)
        end = time.time()
        return {
            "token_ids": [tuple(c.token_ids) for o in outputs for c in o.outputs],
            "start": start,
            "end": end,
        }

    def ping(self) -> int:
        """A no-op round trip."""
        return os.getpid()


# ----- analysis ---------------------------------------------------------------------------------


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _work(spans, start: float, end: float) -> list[tuple[float, float]]:
    clipped = [(max(s.start, start), min(s.end, end)) for s in spans]
    return _union([(a, b) for a, b in clipped if b > a])


def analyse_segment(name: str, start: float, end: float, spans, log: DriverLog) -> dict:
    inside = [s for s in spans if s.end > start and s.start < end]
    union = _work(inside, start, end)
    wall = end - start
    work = sum(b - a for a, b in union)
    lead = (union[0][0] - start) if union else wall
    tail = (end - union[-1][1]) if union else 0.0
    by_op: dict[str, float] = {}
    for e in log.between(start, end, leaf=True):
        ops_work = sum(b - a for a, b in _work(inside, e["start"], e["end"]))
        key = e["label"]
        by_op[key] = by_op.get(key, 0.0) + (e["end"] - e["start"]) - ops_work
    by_op["driver glue"] = (wall - work) - sum(by_op.values())
    span_s: dict[str, float] = {}
    for s in inside:
        span_s[s.name] = max(span_s.get(s.name, 0.0), s.seconds)
    return {
        "segment": name,
        "wall_s": wall,
        "work_s": work,
        "overhead_s": wall - work,
        "lead_s": lead,
        "gap_s": wall - work - lead - tail,
        "tail_s": tail,
        "overhead_by_op_s": by_op,
        "longest_span_s": span_s,
        "spans": len(inside),
    }


def handover_latency(spans, release: str, acquire: str) -> list[float]:
    """Per (step, lane): first acquisition start minus last release end (the switch latency)."""
    out = []
    groups: dict[tuple[int, int], dict[str, list]] = {}
    for s in spans:
        if s.name in (release, acquire):
            for lane in s.lanes:
                groups.setdefault((s.step, lane), {}).setdefault(s.name, []).append(s)
    for g in groups.values():
        if release in g and acquire in g:
            out.append(min(s.start for s in g[acquire]) - max(s.end for s in g[release]))
    return out


def _med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ----- the run ----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--warmup", type=int, default=3, help="RL steps not measured")
    p.add_argument("--steps", type=int, default=15, help="RL steps measured")
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument(
        "--max-tokens", type=int, default=12, help="tokens per completion in the RL loop"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--repeats", type=int, default=15, help="rollout-comparison repeats (>= 3)")
    p.add_argument("--ratio-prompts", type=int, default=16)
    p.add_argument("--ratio-n", type=int, default=8)
    p.add_argument("--ratio-max-tokens", type=int, default=32)
    p.add_argument("--pings", type=int, default=30, help="no-op round trips for the RPC baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="bound on every wait (s)")
    p.add_argument("--verbose", action="store_true", help="show the actors' logs")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be >= 3")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    out = Path(args.json).resolve() if args.json else None
    if os.path.realpath(os.getcwd()) == _HERE:
        os.chdir(os.path.dirname(_HERE))  # Ray puts the driver's cwd on the workers' path too
    model = str(build_tiny_model())
    ray.init(
        address="local",  # a fresh local Ray, never another job's cluster on this machine
        num_cpus=2,
        num_gpus=4,  # 2 reserved by the coordinator, 2 free for the bare engines
        include_dashboard=False,
        log_to_driver=args.verbose,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
    )
    try:
        results = run(args, model)
    finally:
        ray.shutdown()
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
    }
    results["code"] = _code_version()
    results["runtime_s"] = time.perf_counter() - started
    print_report(results)
    if out is not None:
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    return results


def _code_version() -> dict:
    """The commit measured, and how many tracked files differ from it (read-only git calls)."""
    import subprocess

    root = os.path.dirname(_HERE)

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", root, *cmd], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {
        "git_head": git("rev-parse", "HEAD") or None,
        "tracked_files_modified": len(changed),
        "transfer_hook": "Coordinator._transfer"
        if hasattr(Coordinator, "_transfer")
        else "SyncDriver.transfer",
    }


def run(args, model: str) -> dict:
    from transformers import AutoTokenizer

    log = DriverLog()
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    engine_config = EngineConfig(model=model, seed=args.seed, log_level="ERROR")
    coord = Coordinator(
        spec,
        engine_config,
        TrainerConfig(model=model, lr=args.lr, zero_stage=args.zero_stage, seed=args.seed),
        grpo_loss,
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    targets = frozenset(random.Random(args.seed).sample(range(3, len(tokenizer)), TARGET_TOKENS))
    pool = [" ".join(line.split()[:4]) for line in synthetic_corpus(args.seed + 1, 512)]
    rng = random.Random(args.seed)
    sampling = Sampling(n=args.group_size, max_tokens=args.max_tokens, temperature=1.0)
    steps = []
    with instrument(log), contextlib.ExitStack() as stack:
        stack.callback(coord.shutdown)
        t_start = time.perf_counter()
        coord.start()
        startup_s = time.perf_counter() - t_start
        print(f"coordinator started in {startup_s:.1f} s", flush=True)
        for i in range(args.warmup + args.steps):
            prompts = rng.sample(pool, args.prompts)
            t0 = time.time()
            completions = coord.generate(prompts, sampling)
            t1 = time.time()
            rewards = [
                sum(t in targets for t in c.token_ids) / max(1, len(c.token_ids))
                for c in completions
            ]
            batch = make_grpo_batch(completions, rewards, args.group_size, tokenizer.pad_token_id)
            t2 = time.time()
            stats = coord.train(batch)
            t3 = time.time()
            coord.sync()
            t4 = time.time()
            steps.append(
                {
                    "step": i,
                    "warmup": i < args.warmup,
                    "t": (t0, t1, t2, t3, t4),
                    "reward": sum(rewards) / len(rewards),
                    "loss": stats["loss"],
                    "tokens": sum(len(c.token_ids) for c in completions),
                    "transfer_report_s": coord.last_sync.seconds,
                }
            )
            print(
                f"  step {i:2d}{' (warm-up)' if i < args.warmup else '':10s} "
                f"gen {t1 - t0:.3f} s  train {t3 - t2:.3f} s  sync {t4 - t3:.3f} s  "
                f"reward {steps[-1]['reward']:.3f}",
                flush=True,
            )
        rpc = rpc_baseline(coord, args)
        gc_cost = gc_probe(coord, args)
        ratio = rollout_comparison(coord, engine_config, args)
        spans = [s for s in coord.timeline.spans if s.actor != "coordinator"]
        violations = coord.timeline.ordering_violations()
    per_step = [step_record(s, spans, log) for s in steps]
    results = summarise(args, per_step, spans, log, rpc, ratio, startup_s, violations)
    results["gc_probe"] = gc_cost
    return results


def step_record(s: dict, spans, log: DriverLog) -> dict:
    t0, t1, t2, t3, t4 = s["t"]
    transition_end = next(
        e["end"] for e in log.between(t2, t3) if e["label"] == "transition[train]"
    )
    transfer = next(e for e in log.between(t3, t4) if e["label"] == "transfer")
    bounds = {
        "generate": (t0, t1),
        "train_transition": (t2, transition_end),
        "train_step": (transition_end, t3),
        "sync_handover": (t3, transfer["start"]),
        "transfer": (transfer["start"], transfer["end"]),
        "rollout_handover": (transfer["end"], t4),
    }
    segments = {k: analyse_segment(k, a, b, spans, log) for k, (a, b) in bounds.items()}
    step_s = (t1 - t0) + (t4 - t2)
    overhead = sum(seg["overhead_s"] for seg in segments.values())
    outside = [
        sp.name
        for sp in spans
        if t0 <= sp.start < t4 and not any(a <= sp.start < b for a, b in bounds.values())
    ]
    names = sorted({sp.name for sp in spans})
    work_by_name = {}
    for n in names:
        w = sum(b - a for a, b in _work([sp for sp in spans if sp.name == n], t0, t4))
        if w > 0:
            work_by_name[n] = w
    by_op: dict[str, float] = {}
    for seg in segments.values():
        for op, v in seg["overhead_by_op_s"].items():
            by_op[op] = by_op.get(op, 0.0) + v
    return {
        "step": s["step"],
        "warmup": s["warmup"],
        "overhead_by_op_s": by_op,
        "work_by_span_s": work_by_name,
        "generate_s": t1 - t0,
        "train_s": t3 - t2,
        "sync_s": t4 - t3,
        "user_s": t2 - t1,
        "step_s": step_s,
        "window": (t0, t4),
        "overhead_s": overhead,
        "overhead_fraction": overhead / step_s,
        "transition_overhead_s": {k: segments[k]["overhead_s"] for k in TRANSITIONS},
        "segments": segments,
        "spans_outside_segments": outside,
        "reward": s["reward"],
        "loss": s["loss"],
        "tokens": s["tokens"],
        "transfer_report_s": s["transfer_report_s"],
    }


def rpc_baseline(coord: Coordinator, args) -> dict:
    """Ray round trips of a no-op (``drain_spans`` with nothing recorded) to the actors.

    Also a timeline drain done one ``ray.get`` per actor in turn, and batched (all at once,
    as ``Fleet.drain_spans`` does). Whatever is drained goes to the timeline.
    """
    engines, trainers = _actors(coord)
    handles = engines + trainers
    drained = []

    def timed(fn, n: int) -> float:
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        return _med(samples)

    def one(h):
        drained.extend(ray.get(h.drain_spans.remote()))

    result = {
        "engine_rtt_s": timed(lambda: one(engines[0]), args.pings),
        "trainer_rtt_s": timed(lambda: one(trainers[0]), args.pings),
        "drain_sequential_s": timed(lambda: [one(h) for h in handles], args.pings // 3),
        "drain_batched_s": timed(
            lambda: drained.extend(
                s for spans in ray.get([h.drain_spans.remote() for h in handles]) for s in spans
            ),
            args.pings // 3,
        ),
        "actors": len(handles),
    }
    coord.timeline.extend(drained)
    return result


def _gc_probe(actor, rounds: int) -> dict:
    """Runs inside an actor (``__ray_call__``): a full ``gc.collect()``, then after gc.freeze()."""
    import gc

    def timed() -> float:
        t = time.perf_counter()
        gc.collect()
        return time.perf_counter() - t

    full = sorted(timed() for _ in range(rounds))[rounds // 2]
    objects = len(gc.get_objects())
    gc.freeze()  # what-if: long-lived objects moved out of the collector's reach
    try:
        frozen = sorted(timed() for _ in range(rounds))[rounds // 2]
    finally:
        gc.unfreeze()
    return {"gc_collect_s": full, "gc_collect_after_freeze_s": frozen, "tracked_objects": objects}


def gc_probe(coord: Coordinator, args) -> dict:
    """Cost of one full garbage collection in a trainer and an engine process.

    DeepSpeed's ``offload_states`` ends with ``gc.collect()``; this separates that cost from
    the offload itself. The probe runs after the measured steps (no effect on them).
    """
    engines, trainers = _actors(coord)
    return dict(
        zip(
            ("trainer0", "engine0"),
            ray.get(
                [h.__ray_call__.remote(_gc_probe, 5) for h in (trainers[0], engines[0])],
                timeout=args.timeout,
            ),
            strict=True,
        )
    )


def rollout_comparison(coord: Coordinator, engine_config: EngineConfig, args) -> dict:
    pool = [" ".join(line.split()[:4]) for line in synthetic_corpus(args.seed + 2, 512)]
    prompts = random.Random(args.seed + 3).sample(pool, args.ratio_prompts)
    sampling = Sampling(
        n=args.ratio_n,
        max_tokens=args.ratio_max_tokens,
        temperature=1.0,
        extra={"ignore_eos": True},
    )
    n = coord.spec.engines
    bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
    halves = [prompts[bounds[e] : bounds[e + 1]] for e in range(n)]
    cls = ray.remote(BareEngine).options(
        num_gpus=coord.spec.engine_fraction, num_cpus=coord.spec.actor_cpus
    )
    env = _engine_env(coord)  # the coordinator's own engine environment
    engines, _ = _actors(coord)
    bare = [cls.remote(engine_config, env) for _ in range(n)]
    t = time.perf_counter()
    ray.get([b.start.remote() for b in bare], timeout=args.timeout)
    bare_startup_s = time.perf_counter() - t

    def run_kind(kind: str) -> dict:
        start, t0 = time.time(), time.perf_counter()
        inner = None
        if kind == "coordinator":
            tokens = sum(len(c.token_ids) for c in coord.generate(prompts, sampling))
        elif kind == "engine_actors_direct":
            tag = ("rollout", coord.step)
            results = ray.get(
                [h.generate.remote(p, sampling, tag) for h, p in zip(engines, halves, strict=True)],
                timeout=args.timeout,
            )
            tokens = sum(len(c.token_ids) for r in results for c in r)
        else:
            results = ray.get(
                [b.generate.remote(p, sampling) for b, p in zip(bare, halves, strict=True)],
                timeout=args.timeout,
            )
            tokens = sum(len(ids) for r in results for ids in r["token_ids"])
            inner = max(r["end"] for r in results) - min(r["start"] for r in results)
        wall = time.perf_counter() - t0
        return {
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "inner_s": inner,
            "window": (start, time.time()),
        }

    warm = [{k: run_kind(k) for k in RATIO_KINDS} for _ in range(2)]  # 2nd: prefix cache hot
    samples: dict[str, list[dict]] = {k: [] for k in RATIO_KINDS}
    for rep in range(args.repeats):
        order = RATIO_KINDS if rep % 2 == 0 else tuple(reversed(RATIO_KINDS))
        for kind in order:
            samples[kind].append(run_kind(kind))
    for b in bare:
        ray.kill(b, no_restart=True)
    # vLLM's own time inside the engine actors: their engine.generate spans in each call
    coord._collect_spans()
    gen_spans = [s for s in coord.timeline.spans if s.name == "engine.generate"]
    for kind in ("coordinator", "engine_actors_direct"):
        for x in samples[kind]:
            a, b = x["window"]
            inside = [s for s in gen_spans if a <= s.start and s.end <= b]
            if inside:
                x["inner_s"] = max(s.end for s in inside) - min(s.start for s in inside)
    med = {k: _med(s["tokens_per_s"] for s in v) for k, v in samples.items()}
    outside = {
        k: _med(s["wall_s"] - s["inner_s"] for s in v if s["inner_s"] is not None)
        for k, v in samples.items()
    }
    bare_wall = _med(s["wall_s"] for s in samples["bare"])
    paired = [
        c["tokens_per_s"] / b["tokens_per_s"]
        for c, b in zip(samples["coordinator"], samples["bare"], strict=True)
    ]
    return {
        "prompts": len(prompts),
        "n": args.ratio_n,
        "max_tokens": args.ratio_max_tokens,
        "ignore_eos": True,
        "split": [len(h) for h in halves],
        "repeats": args.repeats,
        "bare_startup_s": bare_startup_s,
        "tokens_per_call": {k: v[0]["tokens"] for k, v in samples.items()},
        "median_tokens_per_s": med,
        "median_wall_s": {k: _med(s["wall_s"] for s in v) for k, v in samples.items()},
        "median_inner_generate_s": {
            k: _med(s["inner_s"] for s in v if s["inner_s"] is not None) for k, v in samples.items()
        },
        "median_outside_generate_s": outside,
        "ratio": med["coordinator"] / med["bare"],
        "ratio_engine_actors_direct_vs_bare": med["engine_actors_direct"] / med["bare"],
        "paired_ratios": paired,
        "paired_ratio_median": _med(paired),
        # Noise-robust diagnostic: vLLM's own generate time is the same work on both sides, so
        # the wrapper's cost is the difference in per-call time outside llm.generate.
        "ratio_from_outside_time": bare_wall
        / (bare_wall + outside["coordinator"] - outside["bare"]),
        "warmup": warm,
        "samples": samples,
    }


def summarise(args, per_step, spans, log, rpc, ratio, startup_s, violations) -> dict:
    measured = [r for r in per_step if not r["warmup"]]
    overhead_fraction = _med(r["overhead_fraction"] for r in measured)
    worst = max(
        ((r["step"], k, v) for r in measured for k, v in r["transition_overhead_s"].items()),
        key=lambda x: x[2],
    )
    seg_summary = {}
    for name in SEGMENTS:
        segs = [r["segments"][name] for r in measured]
        ops = sorted({op for s in segs for op in s["overhead_by_op_s"]})
        seg_summary[name] = {
            "wall_s": _med(s["wall_s"] for s in segs),
            "work_s": _med(s["work_s"] for s in segs),
            "overhead_s": _med(s["overhead_s"] for s in segs),
            "overhead_max_s": max(s["overhead_s"] for s in segs),
            "lead_s": _med(s["lead_s"] for s in segs),
            "gap_s": _med(s["gap_s"] for s in segs),
            "tail_s": _med(s["tail_s"] for s in segs),
            "overhead_by_op_s": {
                op: _med(s["overhead_by_op_s"].get(op, 0.0) for s in segs) for op in ops
            },
        }
    lo, hi = measured[0]["window"][0], measured[-1]["window"][1]
    mspans = [s for s in spans if lo <= s.start < hi]
    latency = {
        f"{rel}->{acq}": _med(handover_latency(mspans, rel, acq))
        for rel, acq in (
            ("engine.sleep", "trainer.reload"),
            ("trainer.offload", "engine.wake_weights"),
            ("trainer.offload_params", "engine.wake_kv"),
        )
    }
    drains = [
        e["end"] - e["start"]
        for e in log.events
        if e["label"] == "collect_spans" and lo <= e["start"] < hi
    ]
    names = sorted({n for r in measured for n in r["work_by_span_s"]})
    work = {n: _med(r["work_by_span_s"].get(n, 0.0) for r in measured) for n in names}
    ops = sorted({op for r in measured for op in r["overhead_by_op_s"]})
    by_op = {op: _med(r["overhead_by_op_s"].get(op, 0.0) for r in measured) for op in ops}
    # What-ifs (estimates from this run's own numbers; not targets).
    offload = ("trainer.offload", "trainer.offload_params")
    drains_per_step = len(drains) / len(measured)
    what_if = {
        "overhead_fraction_if_trainer_offload_were_free": _med(
            r["overhead_s"] / (r["step_s"] - sum(r["work_by_span_s"].get(n, 0.0) for n in offload))
            for r in measured
        ),
        "overhead_s_if_drains_batched": _med(
            r["overhead_s"]
            - r["overhead_by_op_s"].get("collect_spans", 0.0)
            + drains_per_step * rpc["drain_batched_s"]
            for r in measured
        ),
        "overhead_s_if_one_batched_drain_per_step": _med(
            r["overhead_s"]
            - r["overhead_by_op_s"].get("collect_spans", 0.0)
            + rpc["drain_batched_s"]
            for r in measured
        ),
    }
    what_if["overhead_fraction_if_one_batched_drain_per_step"] = _med(
        (r["overhead_s"] - r["overhead_by_op_s"].get("collect_spans", 0.0) + rpc["drain_batched_s"])
        / r["step_s"]
        for r in measured
    )
    values = {
        "overhead_fraction": overhead_fraction,
        "max_transition_overhead_s": worst[2],
        "rollout_ratio_vs_bare": ratio["ratio"],
    }
    verdicts = {
        k: "PASS"
        if (v >= TARGETS[k] if k == "rollout_ratio_vs_bare" else v <= TARGETS[k])
        else "MISS"
        for k, v in values.items()
    }
    return {
        **values,
        "targets": TARGETS,
        "verdicts": verdicts,
        "definitions": DEFINITIONS,
        "max_transition_overhead_at": {"step": worst[0], "transition": worst[1]},
        "medians": {
            k: _med(r[k] for r in measured)
            for k in ("generate_s", "train_s", "sync_s", "step_s", "overhead_s", "user_s")
        },
        "segments": seg_summary,
        "step_work_by_span_s": dict(sorted(work.items(), key=lambda x: -x[1])),
        "step_overhead_by_op_s": dict(sorted(by_op.items(), key=lambda x: -x[1])),
        "handover_latency_s": latency,
        "timeline_drain_s": {"median": _med(drains), "per_step": drains_per_step},
        "what_if": what_if,
        "rpc_baseline": rpc,
        "rollout": ratio,
        "steps": per_step,
        "config": {
            "topology": "1 node, 2 logical GPUs, 2 ZeRO trainer ranks + 2 engines, colocated",
            "warmup": args.warmup,
            "measured_steps": args.steps,
            "prompts": args.prompts,
            "group_size": args.group_size,
            "max_tokens": args.max_tokens,
            "zero_stage": args.zero_stage,
            "lr": args.lr,
            "seed": args.seed,
            "sleep_level": 1,
            "memory_effect": "CPU: sleep/wake/offload run but free nothing (DESIGN.md section 4)",
        },
        "coordinator_startup_s": startup_s,
        "ordering_violations": len(violations),
    }


# ----- output -----------------------------------------------------------------------------------


def print_report(r: dict) -> None:
    ms = 1e3
    print()
    c = r["config"]
    print(
        f"phase switch, CPU ({r['machine']['cpu_count']} cores), {c['topology']}; GRPO "
        f"{c['prompts']} prompts x {c['group_size']}, {c['max_tokens']} tokens, ZeRO-"
        f"{c['zero_stage']}; {c['warmup']} warm-up + {c['measured_steps']} measured steps"
    )
    print(f"overhead = segment wall - union of actor spans in it ({DEFINITIONS['work']})")
    head = (
        f"{'step':>4} {'gen_s':>7} {'train_s':>7} {'sync_s':>7} {'step_s':>7} {'ovh_ms':>7} "
        f"{'ovh%':>5} | overhead ms: {'gen':>5} {'tr_tr':>5} {'tr_st':>5} {'syncH':>5} "
        f"{'xfer':>5} {'rollH':>5}"
    )
    print(head)
    for s in r["steps"]:
        seg = s["segments"]
        print(
            f"{s['step']:>4} {s['generate_s']:7.3f} {s['train_s']:7.3f} {s['sync_s']:7.3f} "
            f"{s['step_s']:7.3f} {s['overhead_s'] * ms:7.1f} {s['overhead_fraction'] * 100:5.1f} "
            f"| {'':12s} "
            + " ".join(f"{seg[k]['overhead_s'] * ms:5.1f}" for k in SEGMENTS)
            + ("  (warm-up)" if s["warmup"] else "")
        )
    m = r["medians"]
    print(
        f"median {m['generate_s']:6.3f} {m['train_s']:7.3f} {m['sync_s']:7.3f} "
        f"{m['step_s']:7.3f} {m['overhead_s'] * ms:7.1f}   (user code between calls "
        f"{m['user_s'] * ms:.1f} ms, not in step_s)"
    )
    print()
    print("per segment, medians over measured steps (ms):")
    print(
        f"{'segment':<17} {'wall':>7} {'work':>7} {'ovh':>6} {'max':>6} {'lead':>6} "
        f"{'gaps':>6} {'tail':>6}  overhead by driver operation"
    )
    for name, s in r["segments"].items():
        ops = ", ".join(
            f"{op} {v * ms:.1f}"
            for op, v in sorted(s["overhead_by_op_s"].items(), key=lambda x: -x[1])
        )
        print(
            f"{name:<17} {s['wall_s'] * ms:7.1f} {s['work_s'] * ms:7.1f} "
            f"{s['overhead_s'] * ms:6.1f} {s['overhead_max_s'] * ms:6.1f} {s['lead_s'] * ms:6.1f} "
            f"{s['gap_s'] * ms:6.1f} {s['tail_s'] * ms:6.1f}  {ops}"
        )
    print(
        "actor work per step by span (medians, ms): "
        + ", ".join(f"{n} {v * ms:.1f}" for n, v in r["step_work_by_span_s"].items())
    )
    print(
        "overhead per step by driver operation (medians, ms; all segments): "
        + ", ".join(f"{op} {v * ms:.1f}" for op, v in r["step_overhead_by_op_s"].items())
    )
    print(
        "hand-over switch latency (acquisition start - release end, same GPU), medians: "
        + ", ".join(f"{k} {v * ms:.1f} ms" for k, v in r["handover_latency_s"].items())
    )
    b = r["rpc_baseline"]
    print(
        f"Ray no-op round trip: engine {b['engine_rtt_s'] * ms:.2f} ms, trainer "
        f"{b['trainer_rtt_s'] * ms:.2f} ms; timeline drain of {b['actors']} actors: "
        f"one ray.get per actor in turn "
        f"{b['drain_sequential_s'] * ms:.2f} ms, batched {b['drain_batched_s'] * ms:.2f} ms"
    )
    g = r["gc_probe"]
    print(
        "one gc.collect() (DeepSpeed's offload_states ends with one), median of 5: "
        + ", ".join(
            f"{k} {v['gc_collect_s'] * ms:.1f} ms ({v['tracked_objects']} objects; after "
            f"gc.freeze() {v['gc_collect_after_freeze_s'] * ms:.1f} ms)"
            for k, v in g.items()
        )
    )
    ro = r["rollout"]
    print()
    print(
        f"rollout: {ro['prompts']} prompts x {ro['n']}, {ro['max_tokens']} tokens (ignore_eos), "
        f"split {ro['split']} over 2 engines, {ro['repeats']} alternating repeats, medians"
    )
    for kind in RATIO_KINDS:
        inner = ro["median_inner_generate_s"][kind]
        print(
            f"  {kind:<22} {ro['median_tokens_per_s'][kind]:9.0f} tokens/s  "
            f"{ro['median_wall_s'][kind] * ms:7.1f} ms/call, llm.generate {inner * ms:7.1f} ms, "
            f"outside it {ro['median_outside_generate_s'][kind] * ms:5.1f} ms  "
            f"({ro['tokens_per_call'][kind]} tokens)"
        )
    print(
        "  coordinator/bare per repeat: "
        + ", ".join(f"{x:.3f}" for x in ro["paired_ratios"])
        + f" (median {ro['paired_ratio_median']:.3f}); from the time outside llm.generate "
        f"(noise-robust diagnostic): {ro['ratio_from_outside_time']:.3f}"
    )
    print()
    rows = [
        ("overhead_fraction", f"{r['overhead_fraction']:.4f}", "<= 0.05"),
        ("max_transition_overhead_s", f"{r['max_transition_overhead_s']:.4f}", "<= 0.05"),
        ("rollout_ratio_vs_bare", f"{r['rollout_ratio_vs_bare']:.3f}", ">= 0.95"),
    ]
    at = r["max_transition_overhead_at"]
    print(f"{'metric':<26} {'value':>8} {'target':>8}  verdict")
    for name, value, target in rows:
        print(f"{name:<26} {value:>8} {target:>8}  {r['verdicts'][name]}")
    print(f"  (max transition overhead: {at['transition']} at step {at['step']})")
    if "MISS" in r["verdicts"].values():
        print("why (measured in this run):")
    if r["verdicts"]["overhead_fraction"] == "MISS":
        top = list(r["step_overhead_by_op_s"].items())[:4]
        d = r["timeline_drain_s"]
        print(
            f"  overhead_fraction: {r['medians']['overhead_s'] * ms:.1f} ms/step of "
            f"{r['medians']['step_s'] * ms:.0f} ms; largest parts: "
            + ", ".join(f"{op} {v * ms:.1f} ms" for op, v in top)
            + f"; timeline drains: {d['per_step']:g} per step x {d['median'] * ms:.1f} ms"
        )
    if r["verdicts"]["max_transition_overhead_s"] == "MISS":
        step = next(s for s in r["steps"] if s["step"] == at["step"])
        seg = step["segments"][at["transition"]]
        print(
            f"  max_transition_overhead_s: {at['transition']} at step {at['step']}: "
            + ", ".join(f"{op} {v * ms:.1f} ms" for op, v in seg["overhead_by_op_s"].items())
        )
    if r["verdicts"]["rollout_ratio_vs_bare"] == "MISS":
        wall, inner = ro["median_wall_s"], ro["median_inner_generate_s"]
        print(
            "  rollout_ratio_vs_bare: per call, wall minus llm.generate: "
            + ", ".join(f"{k} {(wall[k] - inner[k]) * ms:.1f} ms" for k in RATIO_KINDS)
            + "; llm.generate itself: "
            + ", ".join(f"{k} {inner[k] * ms:.1f} ms" for k in RATIO_KINDS)
        )
    w = r["what_if"]
    print(
        "what-if estimates (not targets): overhead_fraction if the trainer offloads cost nothing "
        f"{w['overhead_fraction_if_trainer_offload_were_free']:.4f}; if the timeline were drained "
        f"once per step, batched: {w['overhead_fraction_if_one_batched_drain_per_step']:.4f} "
        f"({w['overhead_s_if_one_batched_drain_per_step'] * ms:.1f} ms/step)"
    )
    c = r["code"]
    print(
        f"code measured: {c['git_head']} with {c['tracked_files_modified']} tracked files "
        f"modified (transfer timed at {c['transfer_hook']})"
    )
    la, lb = r["machine"]["loadavg_start"], r["machine"]["loadavg_end"]
    print(
        f"timeline ordering violations: {r['ordering_violations']}; coordinator start-up "
        f"{r['coordinator_startup_s']:.1f} s; load average (1 min) start/end {la[0]:.2f}/"
        f"{lb[0]:.2f}; runtime {r['runtime_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
