"""Multi-turn GRPO with a tool, with the Python API: episodes instead of completions.

Each episode (``colocate.testing.tool_task.LookupEnv``): the model's first turn calls a
``lookup`` tool (50 ms), whose result, the rewarded token ids, is appended as an observation
(loss mask 0); the model's second turn is scored by the share of its tokens among them. The
engines run every episode at its own pace (the next turn as soon as its tool answered) and
return each as one row: ``make_batch`` masks the observation out of the loss.

Run: ``python examples/agent_tools.py`` (a local Ray with 2 logical GPUs on a CPU machine).
The same run from a recipe: ``colocate-rl train --config examples/configs/agent_toy.yaml``.
"""

from transformers import AutoTokenizer

from colocate import (
    Coordinator,
    EngineConfig,
    Sampling,
    TrainerConfig,
    build_tiny_model,
    grpo_loss,
    make_batch,
)
from colocate.agents import AgentConfig
from colocate.algorithms.advantages import Estimator, group_advantages
from colocate.operations.cluster import connect
from colocate.testing.toy_task import TargetTokens
from placement import TopologySpec

STEPS, PROMPTS, GROUP = 20, 16, 8


def main() -> list[float]:
    """Trains for ``STEPS`` steps; returns the mean episode reward of each step."""
    model = str(build_tiny_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    task = TargetTokens.make(len(tokenizer), seed=0)
    rows = [{"prompt": p, "targets": sorted(task.targets)} for p in task.prompts]
    agent = AgentConfig(
        env="colocate.testing.tool_task:LookupEnv",
        env_kwargs={"latency_s": 0.05},
        max_turns=2,
        step_timeout_s=10.0,
    )
    connect(logical_gpus=2)
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    engine = EngineConfig(model=model, max_model_len=512)
    trainer = TrainerConfig(model=model, lr=3e-3)
    sampling = Sampling(n=GROUP, max_tokens=12)  # per turn
    rewards_per_step = []
    with Coordinator(spec, engine, trainer, grpo_loss) as coord:
        for step in range(STEPS):
            batch_rows = rows[step * PROMPTS : (step + 1) * PROMPTS]
            episodes = coord.run_episodes(batch_rows, agent, sampling)
            rewards = [e.reward for e in episodes]
            batch = make_batch([e.completion for e in episodes], tokenizer.pad_token_id)
            batch["advantages"] = group_advantages(rewards, GROUP, Estimator.GRPO)
            stats = coord.train(batch)
            coord.sync()
            turns = sum(e.stats["turns"] for e in episodes) / len(episodes)
            rewards_per_step.append(sum(rewards) / len(rewards))
            print(
                f"step {step}: reward {rewards_per_step[-1]:.3f} loss {stats['loss']:+.3f} "
                f"turns {turns:.1f}"
            )
    return rewards_per_step


if __name__ == "__main__":
    main()
