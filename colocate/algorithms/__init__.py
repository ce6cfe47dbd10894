"""The RL algorithms' pieces: losses, PPO advantages, batches and micro-batches, rollouts and
their staleness, and how metrics combine."""
