"""Multi-turn episodes with tool latency: lockstep turns against the interleaved agent loop.

One vLLM engine (the CPU build, in this process) runs the same workload in two modes, one
after the other, in the balanced order lockstep, interleaved, interleaved, lockstep (ABBA,
``--repeats`` times):

- lockstep (what a competent user writes with ``vllm.LLM`` alone): for each turn, one
  ``LLM.generate`` over every unfinished episode's context (prompt + turns + observations, as
  token ids), then every episode's tool call at once on a thread pool, waiting for all of
  them before the next turn;
- interleaved: ``colocate.agents.AgentLoop`` on the engine's ``LLMEngine``: each episode's
  next turn is submitted as soon as its own tool call returns.

Workload: ``--episodes`` N episodes of ``--turns`` K turns (``colocate.testing.tool_task.
LatencyEnv``): each turn is followed by a tool call that sleeps ``--latency-ms`` (fixed, the
same for every call) and returns 4 observation tokens. Turn lengths are the model's: the
untrained tiny model samples near-uniform tokens (temperature 1) and stops at any of
``--stop-ids`` token ids (plus EOS), so a turn's length is about geometric (stop
probability p = (stop ids + 1) / vocabulary), capped at ``--turn-tokens``; the JSON's
``workload`` states p and the measured turn lengths. The default (50 stop ids, p ~ 0.05,
turns of ~19 tokens on average, a tail to the cap of 96) stands for tool-calling turns: mostly
a short call, now and then a long one. Both modes sample with the same settings.

Keys: ``episodes_per_s_lockstep`` and ``episodes_per_s_interleaved`` = episodes finished /
wall seconds of the mode's blocks (pooled); ``speedup`` = interleaved / lockstep;
``speedup_of_medians`` = the lockstep blocks' median seconds / the interleaved blocks'
(robust to one block that met a slow first shape). The verdict takes the smaller of the two
(target >= 2 with 50 ms mean tool latency, on the 2-core CPU machine).
``mask_errors``: episodes, of both modes, whose tokens or loss mask differ from what their
environment saw and returned (each model turn's token ids as the environment received them,
mask 1; each observation's ids, mask 0), or whose ``make_batch`` row's ``completion_mask``
differs from that mask (target 0).
``interleaving``: in the interleaved blocks, the share of turns (after the first) submitted
while a turn of another episode with a lower index was still running in the engine.

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_multiturn.py --json out.json``
(about a minute; not a test).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import os
import statistics
import sys
import time

from common import add_model_args, code_version, machine, model_spec, verdict, write_json

from colocate import EngineConfig, Sampling, build_tiny_model, make_batch
from colocate.actors.engine import llm_kwargs
from colocate.agents import AgentConfig, AgentLoop, EpisodeStart, Turn
from colocate.testing.tool_task import LatencyEnv

TARGET_SPEEDUP = 2.0
WORDS = ("kato", "rimu", "sela", "ponu", "vari", "nemo", "tuli", "basa", "orin", "leku")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--episodes", type=int, default=32, help="N: episodes per block")
    p.add_argument("--turns", type=int, default=8, help="K: model turns per episode")
    p.add_argument("--latency-ms", type=float, default=50.0, help="tool latency (its mean)")
    p.add_argument(
        "--latency",
        choices=("exponential", "fixed"),
        default="exponential",
        help="each call's latency: drawn, exponential with mean --latency-ms; or exactly it",
    )
    p.add_argument("--turn-tokens", type=int, default=96, help="tokens per turn (the cap)")
    p.add_argument("--stop-ids", type=int, default=50, help="stop token ids (ids 3, 4, ...)")
    p.add_argument("--repeats", type=int, default=2, help="blocks per mode, order ABBA ...")
    p.add_argument("--warmup", type=int, default=3, help="untimed blocks per mode first")
    add_model_args(p, hidden=128, intermediate=256, layers=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.episodes, args.turns, args.turn_tokens, args.repeats) < 1:
        p.error("--episodes, --turns, --turn-tokens and --repeats must be >= 1")
    if args.latency_ms < 0:
        p.error("--latency-ms must be >= 0")
    return args


class RecordingEnv(LatencyEnv):
    """:class:`LatencyEnv` that records what it saw and returned (for the mask check)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[tuple[tuple[int, ...], list[int]]] = []  # (turn ids, observation)

    def step(self, turn: Turn):
        result = super().step(turn)
        self.seen.append((tuple(turn.token_ids), [] if result.done else list(result.observation)))
        return result


def env_kwargs(args) -> dict:
    """The workload's environment arguments."""
    return {
        "turns": args.turns,
        "latency_s": args.latency_ms / 1000,
        "exponential": args.latency == "exponential",
    }


def expected(env: RecordingEnv) -> tuple[list[int], list[int]]:
    """The tokens and loss mask an episode must have, from its environment's record."""
    ids, mask = [], []
    for turn, observation in env.seen:
        ids += [*turn, *observation]
        mask += [1] * len(turn) + [0] * len(observation)
    return ids, mask


def mask_errors(episodes: list[tuple], pad_id: int) -> int:
    """Episodes whose ids, mask or batch row differ from their environment's record."""
    errors = 0
    for completion, env in episodes:
        ids, mask = expected(env)
        ok = list(completion.token_ids) == ids and list(completion.loss_mask) == mask
        row = make_batch([completion], pad_id)["completion_mask"][0].tolist()
        p = len(completion.prompt_token_ids)
        ok = ok and row[:p] == [0.0] * p and row[p : p + len(mask)] == [float(m) for m in mask]
        errors += not ok
    return errors


def lockstep(llm, tokenizer, prompts, args, sampling, pool) -> tuple[list, list[int]]:
    """Turn by turn over every episode: one generate, then every tool call, then the next."""
    from colocate.core.contract import Completion

    envs = [RecordingEnv(**env_kwargs(args)) for _ in prompts]
    prompt_ids = [tokenizer.encode(env.reset(p)) for env, p in zip(envs, prompts, strict=True)]
    ids = [[] for _ in prompts]
    mask = [[] for _ in prompts]
    lengths, active = [], list(range(len(prompts)))
    params = sampling.to_vllm()
    params.max_tokens = args.turn_tokens
    for k in range(args.turns):
        outs = llm.generate(
            [{"prompt_token_ids": prompt_ids[i] + ids[i]} for i in active], params, use_tqdm=False
        )
        turns = {}
        for i, out in zip(active, outs, strict=True):
            tokens = list(out.outputs[0].token_ids)
            ids[i] += tokens
            mask[i] += [1] * len(tokens)
            lengths.append(len(tokens))
            turns[i] = Turn(k, tuple(tokens), "", out.outputs[0].finish_reason)
        steps = [pool.submit(envs[i].step, turns[i]) for i in active]  # every tool at once
        results = {i: f.result() for i, f in zip(active, steps, strict=True)}
        for i in active:
            if not results[i].done:
                ids[i] += list(results[i].observation)
                mask[i] += [0] * len(results[i].observation)
        active = [i for i in active if not results[i].done]
    episodes = [
        (
            Completion(
                prompt_index=i,
                sample_index=0,
                prompt_token_ids=tuple(prompt_ids[i]),
                token_ids=tuple(ids[i]),
                logprobs=(),
                text="",
                finish_reason=None,
                weight_version=0,
                loss_mask=tuple(mask[i]),
            ),
            envs[i],
        )
        for i in range(len(prompts))
    ]
    return episodes, lengths


def interleaved(loop, llm, prompts, sampling, block: int) -> tuple[list, list[int], float]:
    """Every episode in the agent loop; returns the episodes, turn lengths, interleaving."""
    episodes = loop.start([EpisodeStart(block * 1000 + i, 0, p) for i, p in enumerate(prompts)])
    loop.run(llm.llm_engine, episodes, sampling, version=0)
    results = [(e.result("").completion, e.env) for e in episodes]
    lengths = [len(turn) for e in episodes for turn, _ in e.env.seen]
    spans = [(i, s) for i, e in enumerate(episodes) for s in e.turn_steps]
    later = [(i, s) for i, s in spans if s[0] > 0]
    overlapped = sum(any(j < i and o[0] <= s[0] < o[1] for j, o in spans) for i, s in later)
    return results, lengths, overlapped / max(1, len(later))


#: The environment the library's engine actors get on CPU (``Fleet.engine_env``): the engine
#: core in the engine's process, and no torch.compile of an eager engine's log-prob gather.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if any(os.environ.get(k) != v for k, v in ENGINE_ENV.items()):
        # vLLM reads it at import: this process starts again with it, passed explicitly
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **ENGINE_ENV})
    max_len = 64 + args.turns * (args.turn_tokens + 8)
    model = str(build_tiny_model(model_spec(args, max_len)))
    config = EngineConfig(
        model=model,
        max_model_len=max_len,
        kv_cache_bytes=256 << 20,
        max_num_seqs=256,
        seed=args.seed,
    )
    import vllm

    llm = vllm.LLM(**llm_kwargs(config, cuda=False))
    tokenizer = llm.get_tokenizer()
    vocab = len(tokenizer)
    stop_ids = list(range(3, 3 + args.stop_ids))
    sampling = Sampling(
        n=1, max_tokens=args.turn_tokens, temperature=1.0, extra={"stop_token_ids": stop_ids}
    )
    agent = AgentConfig(
        RecordingEnv,
        env_kwargs=env_kwargs(args),
        max_turns=args.turns,
        turn_tokens=args.turn_tokens,
        step_workers=args.episodes,
    )
    loop = AgentLoop(agent, tokenizer, max_len)
    pool = cf.ThreadPoolExecutor(args.episodes)
    pairs = [("lockstep", "interleaved"), ("interleaved", "lockstep")]
    order = [m for i in range(args.repeats) for m in pairs[i % 2]]  # ABBA ...
    # Untimed blocks first: the CPU engine's first steps at each new batch size and context
    # length are many times slower than later ones (measured: 34 s, then 16 s, then 1.8 s for
    # the same lockstep block), so both modes run at least --warmup blocks and until each
    # mode's last two warm-up blocks agree within 25% (at most 3 --warmup blocks).
    warmup: dict[str, list[float]] = {"lockstep": [], "interleaved": []}
    for w in range(3 * args.warmup):
        warm = [f"{WORDS[(i + w) % 10]} {i}" for i in range(args.episodes)]
        for mode in warmup:
            start = time.perf_counter()
            if mode == "lockstep":
                lockstep(llm, tokenizer, warm, args, sampling, pool)
            else:
                interleaved(loop, llm, warm, sampling, block=900 + w)
            warmup[mode].append(time.perf_counter() - start)
            print(f"warm-up {w}: {mode:12s} {warmup[mode][-1]:6.2f} s")
        if w + 1 >= args.warmup and all(max(t[-2:]) < 1.25 * min(t[-2:]) for t in warmup.values()):
            break
    figures = {
        m: {"seconds": [], "episodes": 0, "lengths": [], "errors": 0}
        for m in ("lockstep", "interleaved")
    }
    share = []
    for b, mode in enumerate(order):
        prompts = [
            f"{WORDS[(i * 7 + b) % 10]} {WORDS[(i * 3) % 10]} {i}" for i in range(args.episodes)
        ]
        gc.collect()  # neither mode pays for the other's garbage
        start = time.perf_counter()
        if mode == "lockstep":
            episodes, lengths = lockstep(llm, tokenizer, prompts, args, sampling, pool)
        else:
            episodes, lengths, overlap = interleaved(loop, llm, prompts, sampling, b)
            share.append(overlap)
        seconds = time.perf_counter() - start
        f = figures[mode]
        f["seconds"].append(seconds)
        f["episodes"] += len(episodes)
        f["lengths"] += lengths
        f["errors"] += mask_errors(episodes, tokenizer.pad_token_id or 0)
        print(f"block {b}: {mode:12s} {seconds:6.2f} s  {len(episodes) / seconds:6.2f} episodes/s")
    loop.close()
    pool.shutdown()
    rate = {m: f["episodes"] / sum(f["seconds"]) for m, f in figures.items()}
    speedup = rate["interleaved"] / rate["lockstep"]
    # Robust to a block that met a new shape after the warm-up: the blocks' medians.
    medians = {m: statistics.median(f["seconds"]) for m, f in figures.items()}
    robust = medians["lockstep"] / medians["interleaved"]
    errors = sum(f["errors"] for f in figures.values())
    lengths = figures["lockstep"]["lengths"] + figures["interleaved"]["lengths"]
    results = {
        "benchmark": "multiturn",
        "device": "cpu (vLLM CPU build)",
        "episodes_per_s_lockstep": round(rate["lockstep"], 3),
        "episodes_per_s_interleaved": round(rate["interleaved"], 3),
        "speedup": round(speedup, 3),
        "mask_errors": errors,
        "interleaving": round(statistics.mean(share), 3) if share else 0.0,
        "speedup_of_medians": round(robust, 3),
        "blocks": {m: [round(s, 3) for s in f["seconds"]] for m, f in figures.items()},
        "warmup_blocks": {m: [round(s, 3) for s in t] for m, t in warmup.items()},
        "workload": {
            "episodes": args.episodes,
            "turns": args.turns,
            "tool_latency_ms": args.latency_ms,
            "tool_latency": (
                "exponential per call (mean above), seeded by episode and turn"
                if args.latency == "exponential"
                else "fixed, every call"
            ),
            "turn_tokens_cap": args.turn_tokens,
            "stop_probability": round((len(stop_ids) + 1) / vocab, 4),
            "turn_length_mean": round(statistics.mean(lengths), 1),
            "turn_length_median": statistics.median(lengths),
            "turn_length_max": max(lengths),
        },
        "targets": {"speedup": TARGET_SPEEDUP, "mask_errors": 0},
        "speedup_pass": verdict(
            min(speedup, medians["lockstep"] / medians["interleaved"]), TARGET_SPEEDUP, True
        ),
        "mask_errors_pass": verdict(errors, 0, False),
        "machine": machine(),
        "code": code_version(),
    }
    results["pass"] = (
        "PASS" if {results["speedup_pass"], results["mask_errors_pass"]} == {"PASS"} else "MISS"
    )
    print(
        {
            k: results[k]
            for k in (
                "episodes_per_s_lockstep",
                "episodes_per_s_interleaved",
                "speedup",
                "mask_errors",
                "interleaving",
                "pass",
            )
        }
    )
    print(results["workload"])
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
