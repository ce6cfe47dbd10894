"""A task the runner's tests write themselves: prompts, a reward module, a recipe.

Nothing of the repository's own task code is used: made-up words as prompts, the rewarded
token ids as a dataset column, the reward function in a file the test writes.
"""

import json
import random
from pathlib import Path

REWARD_MODULE = """
def share(prompt, completion, completion_ids, row, **_):
    wanted = set(row["wanted"])
    return sum(t in wanted for t in completion_ids) / max(1, len(completion_ids))


def length(prompt, completion, completion_ids, row, scale=1.0, **_):
    return {"score": 0.0, "tokens": scale * len(completion_ids)}
"""


def words(rng: random.Random, n: int) -> str:
    """``n`` made-up words."""
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ro", "vi", "pe", "du"]
    return " ".join("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(n))


def write_task(root: Path, vocab: int) -> dict:
    """Writes ``train.jsonl``, ``eval.jsonl`` and ``my_rewards.py`` under ``root``."""
    rng = random.Random(7)
    wanted = sorted(rng.sample(range(3, vocab), 10))
    paths = {}
    for name, count in (("train", 300), ("eval", 24)):
        paths[name] = root / f"{name}.jsonl"
        rows = [{"question": words(rng, 4), "wanted": wanted} for _ in range(count)]
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "my_rewards.py").write_text(REWARD_MODULE)
    return {"wanted": wanted, **paths}


#: A recipe over that task (format it with ``steps``).
RECIPE = """
model: {{path: tiny}}
data: {{train: train.jsonl, eval: eval.jsonl, prompt_key: question}}
reward:
  functions: ["my_rewards.py:share", "my_rewards.py:length"]
  kwargs: {{length: {{scale: 2.0}}}}
rollout: {{prompts: 16, group_size: 8, max_tokens: 12, max_model_len: 512}}
trainer: {{lr: 3.0e-3}}
eval: {{every: 7, prompts: 12, k: 4, pass_threshold: 0.5}}
log: {{progress: false, tensorboard: true}}
steps: {steps}
out: out
"""
