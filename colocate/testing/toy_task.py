"""The toy task of the examples and benchmarks: emit tokens from a fixed set of 10.

The reward of a completion is the fraction of its tokens in the target set; an untrained model
scores about 10 / vocabulary size. Prompts are short lines of the tiny model's synthetic
corpus. One definition, imported by every example and benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TargetTokens", "TARGET_TOKENS", "target_fraction", "write_dataset"]

TARGET_TOKENS = 10
_SPECIAL = 3  # the tokenizer's special tokens come first and are never rewarded


@dataclass(frozen=True)
class TargetTokens:
    """The task for one seed: the rewarded token ids and the prompt pool.

    Attributes:
        targets: The rewarded token ids.
        prompts: Prompt strings to sample from.
    """

    targets: frozenset[int]
    prompts: tuple[str, ...]

    @classmethod
    def make(cls, vocab_size: int, seed: int, pool_size: int = 512) -> TargetTokens:
        """The task for ``seed``: 10 target ids of ``vocab_size``, ``pool_size`` prompts."""
        from colocate.testing.tiny_model import synthetic_corpus

        rng = random.Random(seed)
        targets = frozenset(rng.sample(range(_SPECIAL, vocab_size), TARGET_TOKENS))
        prompts = tuple(
            " ".join(line.split()[:4]) for line in synthetic_corpus(seed + 1, pool_size)
        )
        return cls(targets, prompts)

    def reward(self, token_ids: Sequence[int]) -> float:
        """Fraction of ``token_ids`` in the target set (0 for an empty completion)."""
        return sum(t in self.targets for t in token_ids) / max(1, len(token_ids))

    def sample_prompts(self, rng: random.Random, n: int) -> list[str]:
        """``n`` distinct prompts drawn with ``rng``."""
        return rng.sample(self.prompts, n)


def target_fraction(prompt, completion, completion_ids, row, **_) -> float:
    """The toy task as a reward function of the runner: the share of ``row["targets"]`` ids.

    The signature is the runner's (``colocate.runner.rewards``): the dataset row carries the
    rewarded token ids (:func:`write_dataset`).
    """
    targets = set(row["targets"])
    return sum(t in targets for t in completion_ids) / max(1, len(completion_ids))


def write_dataset(out, vocab_size: int, seed: int = 0, eval_rows: int = 32) -> dict:
    """Writes the toy task as a prompt dataset: ``OUT/train.jsonl`` and ``OUT/eval.jsonl``.

    Each row has ``prompt`` (text) and ``targets`` (the rewarded token ids, the same in every
    row); the eval rows are the last ``eval_rows`` prompts of the pool. Returns the paths.
    """
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = TargetTokens.make(vocab_size, seed)
    targets = sorted(task.targets)
    prompts = list(dict.fromkeys(task.prompts))  # distinct, in pool order
    paths = {}
    for name, part in (("train", prompts[:-eval_rows]), ("eval", prompts[-eval_rows:])):
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w") as f:
            for prompt in part:
                f.write(json.dumps({"prompt": prompt, "targets": targets}) + "\n")
    return {k: str(v) for k, v in paths.items()}


if __name__ == "__main__":  # python -m colocate.testing.toy_task OUT [MODEL]: the demo's data
    import sys

    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model

    model = sys.argv[2] if len(sys.argv) > 2 else str(build_tiny_model())
    print(write_dataset(sys.argv[1], len(AutoTokenizer.from_pretrained(model))))
