"""The toy task of the examples and benchmarks: emit tokens from a fixed set of 10.

The reward of a completion is the fraction of its tokens in the target set; an untrained model
scores about 10 / vocabulary size. Prompts are short lines of the tiny model's synthetic
corpus. One definition, imported by every example and benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TargetTokens", "TARGET_TOKENS"]

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
