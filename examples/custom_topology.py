"""Your own topology, loss and reward with the public API: a separate pool, then a colocated one.

1. Separate pools: trainer rank on GPU 0, a vLLM engine on GPU 1 (no memory hand-over: the
   coordinator skips the memory steps but keeps the phase order and the verified sync).
2. Colocated: two trainer ranks and two engines sharing GPUs 0 and 1.

Both use a user-defined REINFORCE-style loss and reward. Runs as ``python
examples/custom_topology.py`` (local Ray with 4 logical GPUs on a CPU machine) or with
``ray job submit``.
"""

from __future__ import annotations

import argparse

from colocate import (
    Coordinator,
    EngineConfig,
    Sampling,
    TrainerConfig,
    build_tiny_model,
    make_grpo_batch,
    token_logprobs,
)
from colocate.cli import Checker
from colocate.cluster import connect
from placement import TopologySpec


def reinforce_loss(model, batch):
    """Plain REINFORCE with a group baseline: -(advantage x log-prob) over generated tokens."""
    mask = batch["completion_mask"]
    logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    adv = batch["advantages"].unsqueeze(1)
    loss = -(adv * logp * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"mean_logprob": float((logp * mask).sum() / mask.sum().clamp(min=1.0))}


def short_reward(token_ids) -> float:
    """Rewards completions that use low token ids (an arbitrary, learnable preference)."""
    return sum(t < 200 for t in token_ids) / max(1, len(token_ids))


def run(name: str, spec: TopologySpec, model: str, steps: int) -> None:
    sampling = Sampling(n=4, max_tokens=8)
    prompts = ["kato rimu", "sena lo pe", "vi da go", "ru hi ze"]
    engine = EngineConfig(model=model, tensor_parallel_size=spec.engine_tp, log_level="ERROR")
    trainer = TrainerConfig(model=model, lr=2e-3, zero_stage=2)
    with Coordinator(spec, engine, trainer, reinforce_loss, name=name) as coord:
        for step in range(steps):
            completions = coord.generate(prompts, sampling)
            rewards = [short_reward(c.token_ids) for c in completions]
            batch = make_grpo_batch(completions, rewards, sampling.n, pad_id=2)
            stats = coord.train(batch)
            report = coord.sync()
            print(
                f"[{name}] step {step}: reward {sum(rewards) / len(rewards):.3f}, "
                f"loss {stats['loss']:+.4f}, synced v{report.version} "
                f"({report.bytes / 2**20:.2f} MiB in {report.seconds:.3f} s, "
                f"{report.verified_tensors} tensors verified)"
            )
        violations = coord.timeline.ordering_violations()
        print(f"[{name}] done: colocated={coord.colocated}, ordering violations: {violations}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local HF model directory (default: the tiny model)")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    check = Checker(p, args)  # every flag, before anything starts (exit 2 on bad usage)
    check.at_least("--steps", 1)
    check.existing_dir("--model", must_hold="config.json")
    model = args.model or str(build_tiny_model())
    connect(logical_gpus=4)
    separate = TopologySpec(
        nodes=1, gpus_per_node=2, trainer_world_size=1, engines=1, colocate=False
    )
    run("separate", separate, model, args.steps)
    colocated = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    run("colocated", colocated, model, args.steps)


if __name__ == "__main__":
    main()
