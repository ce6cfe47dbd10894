r"""A locally generated arithmetic dataset (the math recipe's data; no download).

Each row: ``messages`` (one user turn asking for the result of a small sum or product, with
the answer to be given in ``\\boxed{}``), ``prompt`` (the same question as plain text) and
``answer`` (the result as a string), for ``colocate.runner.reward_functions:math_answer``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["make_rows", "write_dataset"]

_ASK = "What is {a} {op} {b}? Think briefly, then give the final answer as \\boxed{{N}}."


def make_rows(count: int, seed: int) -> list[dict]:
    """``count`` questions drawn with ``seed`` (sums and products of 1-2 digit numbers)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = _ASK.format(a=a, op=op, b=b)
        rows.append(
            {
                "messages": [{"role": "user", "content": question}],
                "prompt": question,
                "answer": str(value),
            }
        )
    return rows


def write_dataset(out, train_rows: int = 2000, eval_rows: int = 100, seed: int = 0) -> dict:
    """Writes ``OUT/train.jsonl`` and ``OUT/eval.jsonl``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(train_rows + eval_rows, seed)
    paths = {}
    for name, part in (("train", rows[:train_rows]), ("eval", rows[train_rows:])):
        paths[name] = str(out / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


if __name__ == "__main__":  # python -m colocate.testing.arithmetic OUT
    import sys

    print(write_dataset(sys.argv[1]))
