"""GRPO with the Python API, top to bottom: trainer and vLLM engines sharing 2 GPUs.

The task (a toy): make the tiny local model emit tokens from a fixed set of 10; the reward
is the share of such tokens in a completion. Each step: the engines sample 8 completions per
prompt, rewards give group-normalised advantages, DeepSpeed trains the policy, and a verified
weight sync hands the new weights to the engines. The coordinator runs each hand-over: on
every GPU the engine sleeps before the trainer reloads, and the other way round.

Run: ``python examples/grpo_minimal.py`` (a local Ray with 2 logical GPUs on a CPU machine).
For a dataset, reward functions, evaluation and export without writing this loop, see
``colocate-rl train --config examples/configs/grpo_toy.yaml``.
"""

import random

from transformers import AutoTokenizer

from colocate import (
    Coordinator,
    EngineConfig,
    Sampling,
    TrainerConfig,
    build_tiny_model,
    grpo_loss,
    make_grpo_batch,
)
from colocate.operations.cluster import connect
from colocate.testing.toy_task import TargetTokens
from placement import TopologySpec

STEPS, PROMPTS, GROUP = 20, 16, 8


def main() -> list[float]:
    """Trains for ``STEPS`` steps; returns the mean reward of each step."""
    model = str(build_tiny_model())  # a tiny Llama and tokenizer, built locally
    tokenizer = AutoTokenizer.from_pretrained(model)
    task = TargetTokens.make(len(tokenizer), seed=0)
    connect(logical_gpus=2)
    # Two GPUs, both shared: two trainer ranks (ZeRO-3) and two engines.
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    engine = EngineConfig(model=model, max_model_len=512)
    trainer = TrainerConfig(model=model, lr=3e-3)
    sampling = Sampling(n=GROUP, max_tokens=12)
    rng, rewards_per_step = random.Random(0), []
    with Coordinator(spec, engine, trainer, grpo_loss) as coord:  # starts; the first sync
        for step in range(STEPS):
            completions = coord.generate(task.sample_prompts(rng, PROMPTS), sampling)
            rewards = [task.reward(c.token_ids) for c in completions]
            batch = make_grpo_batch(completions, rewards, GROUP, tokenizer.pad_token_id)
            stats = coord.train(batch)  # engines sleep, trainer reloads, one optimizer step
            coord.sync()  # trainer offloads, engines wake and verify the new weights
            rewards_per_step.append(sum(rewards) / len(rewards))
            print(f"step {step}: reward {rewards_per_step[-1]:.3f} loss {stats['loss']:+.3f}")
    return rewards_per_step


if __name__ == "__main__":
    main()
