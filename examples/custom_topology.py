"""Your own topology, loss and reward with the public API: a separate pool, then a colocated one.

1. Separate pools: trainer rank on GPU 0, a vLLM engine on GPU 1 (no memory hand-over: the
   coordinator skips the memory steps but keeps the phase order and the verified sync).
2. Colocated: two trainer ranks and two engines sharing GPUs 0 and 1, plus a tenant of the
   user's own: ``ShortJudge``, a role (one rank beside each trainer rank) that scores the
   completions in the SCORE phase. The coordinator orders its memory like any built-in
   tenant's: on each GPU it reloads only after the engine there slept, and offloads before
   the trainer reloads.

Both use a user-defined REINFORCE-style loss and reward. Runs as ``python
examples/custom_topology.py`` (local Ray with 4 logical GPUs on a CPU machine) or with
``ray job submit``.
"""

from __future__ import annotations

import argparse

import torch

from colocate import (
    Coordinator,
    EngineConfig,
    Phase,
    Role,
    RoleActor,
    RoleFootprint,
    Sampling,
    TrainerConfig,
    batch_logprobs,
    build_tiny_model,
    make_grpo_batch,
)
from colocate.operations.cli import Checker
from colocate.operations.cluster import connect
from placement import TopologySpec


def reinforce_loss(model, batch):
    """Plain REINFORCE with a group baseline: -(advantage x log-prob) over generated tokens.

    Takes padded rows or packed micro-batches (``batch_logprobs``; a packed batch's advantages
    are already one per token).
    """
    mask = batch["completion_mask"]
    logp = batch_logprobs(model, batch)
    adv = batch["advantages"]
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    loss = -(adv * logp * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"mean_logprob": float((logp * mask).sum() / mask.sum().clamp(min=1.0))}


def short_reward(token_ids) -> float:
    """Rewards completions that use low token ids (an arbitrary, learnable preference)."""
    return sum(t < 200 for t in token_ids) / max(1, len(token_ids))


class ShortJudge(RoleActor):
    """A user's tenant: scores completions with :func:`short_reward` on the GPUs of its bundles.

    A real judge would hold a model: ``build`` returns it (in host memory) and the base class
    moves it between host and GPU when the coordinator says so.
    """

    @classmethod
    def footprint(cls, config) -> RoleFootprint:
        """For the memory plan: its stand-in model, Linear(1, 1) in fp32, 8 bytes resident.

        A judge holding a real model would return ``RoleFootprint.frozen(model_shape(dir))``.
        """
        return RoleFootprint.declared(resident_bytes=8)

    def build(self):
        """The judge's model, in host memory (a stand-in here)."""
        return torch.nn.Linear(1, 1)

    def rewards(self, batch: dict) -> list[float]:
        """One reward per row of ``batch["token_ids"]``."""
        self.require_resident("rewards")
        with self.span("judge.rewards", rows=len(batch["token_ids"])):
            return [short_reward(ids) for ids in batch["token_ids"]]


def run(name: str, spec: TopologySpec, model: str, steps: int, judge: bool = False) -> None:
    sampling = Sampling(n=4, max_tokens=8)
    prompts = ["kato rimu", "sena lo pe", "vi da go", "ru hi ze"]
    engine = EngineConfig(model=model, tensor_parallel_size=spec.engine_tp, log_level="ERROR")
    trainer = TrainerConfig(model=model, lr=2e-3, zero_stage=2)
    roles = [Role("judge", ShortJudge, phases=frozenset({Phase.SCORE}))] if judge else []
    with Coordinator(spec, engine, trainer, reinforce_loss, name=name, roles=roles) as coord:
        for step in range(steps):
            completions = coord.generate(prompts, sampling)
            if judge:  # the score row, then the judge's ranks, in one driver wait
                rows = {"token_ids": [list(c.token_ids) for c in completions]}
                rewards = coord.call_role("judge", ShortJudge.rewards, rows)
            else:
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
        judged = sorted({s.actor for s in coord.timeline.spans if s.name == "judge.rewards"})
        if judge:
            print(f"[{name}] rewards from the user's tenant: {judged}")
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
    run("colocated", colocated, model, args.steps, judge=True)


if __name__ == "__main__":
    main()
