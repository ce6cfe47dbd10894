r"""Built-in reward functions, named in a recipe as ``colocate.runner.reward_functions:NAME``.

Each has the signature of :mod:`colocate.runner.rewards`: called with keyword arguments
``prompt``, ``completion``, ``completion_ids`` and ``row`` plus its own from
``reward.kwargs.NAME``, it returns a float. For example::

    reward:
      functions:
        - colocate.runner.reward_functions:math_answer
        - colocate.runner.reward_functions:format_regex
        - colocate.runner.reward_functions:overlong_penalty
      weights: [1.0, 0.1, 1.0]
      kwargs:
        format_regex: {pattern: "\\boxed\\{.+\\}"}
        overlong_penalty: {max_tokens: 512, buffer: 128}
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from math_verify import parse, verify

__all__ = ["math_answer", "format_regex", "overlong_penalty"]


def math_answer(
    prompt: str,
    completion: str,
    completion_ids: Sequence[int],
    row: dict,
    answer_key: str = "answer",
    **_: object,
) -> float:
    r"""1.0 if the completion's final answer equals the row's answer (math-verify), else 0.0.

    Both the gold answer ``row[answer_key]`` (a number, or a string such as ``"42"``,
    ``"1/2"``, ``"\frac{1}{2}"`` or ``"\boxed{42}"``) and the completion are parsed by
    ``math_verify.parse`` and compared by ``math_verify.verify`` (gold first: it is not
    symmetric). As math-verify 0.9 parses free text: a ``\boxed{...}`` answer wins over other
    numbers (``"The answer is \boxed{42}. Also 7."`` gives 42); without one, the last number
    or expression in the text is taken (``"The answer is 42."`` gives 42; ``"I think 41, no
    43"`` gives 43); text with no number gives nothing, which scores 0. Values are compared
    as numbers and expressions: ``"0.5"``, ``"1/2"`` and ``"\frac{1}{2}"`` are equal, and
    ``"42.0"`` equals ``42``.

    math-verify's own timeouts use ``signal.alarm``, which works only in a process's main
    thread; the reward workers call functions in threads, so they are turned off here
    (``parsing_timeout=None``, ``timeout_seconds=None``) and the scorer's ``reward.timeout_s``
    bounds the call instead. Called outside the scorer, nothing bounds it.

    Args:
        prompt: Unused.
        completion: The completion's text.
        completion_ids: Unused.
        row: The prompt's dataset row, holding the gold answer.
        answer_key: The row's column holding the gold answer.

    Returns:
        1.0 or 0.0.

    Raises:
        KeyError: The row has no ``answer_key`` column.
    """
    if answer_key not in row:
        raise KeyError(
            f"the row has no {answer_key!r} column (columns: {', '.join(map(str, row))}); "
            "pass reward.kwargs.math_answer.answer_key=COLUMN"
        )
    gold = parse(str(row[answer_key]), parsing_timeout=None)
    answer = parse(completion, parsing_timeout=None)
    if not gold or not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0


def format_regex(
    prompt: str,
    completion: str,
    completion_ids: Sequence[int],
    row: dict,
    pattern: str,
    **_: object,
) -> float:
    """1.0 if ``pattern`` occurs anywhere in the completion, else 0.0.

    Uses ``re.search(pattern, completion, re.DOTALL)``: the pattern may match any part of the
    completion (anchor it with ``^`` and ``$`` to ask for the whole), and ``.`` crosses line
    ends.

    Args:
        prompt: Unused.
        completion: The completion's text.
        completion_ids: Unused.
        row: Unused.
        pattern: A Python regular expression.

    Returns:
        1.0 or 0.0.
    """
    return 1.0 if re.search(pattern, completion, re.DOTALL) else 0.0


def overlong_penalty(
    prompt: str,
    completion: str,
    completion_ids: Sequence[int],
    row: dict,
    max_tokens: int,
    buffer: int,
    **_: object,
) -> float:
    """DAPO's soft overlong punishment: a penalty rising linearly over the last ``buffer`` tokens.

    From DAPO (Yu et al., 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale", arXiv:2503.14476, Eq. 13), with ``L = len(completion_ids)``, ``L_max =
    max_tokens`` and ``L_cache = buffer``: 0 when ``L <= L_max - L_cache``;
    ``((L_max - L_cache) - L) / L_cache`` (from 0 down to -1) when ``L_max - L_cache < L <=
    L_max``; -1 when ``L > L_max``. Added to a correctness reward (weight 1 in DAPO).

    Args:
        prompt: Unused.
        completion: Unused.
        completion_ids: The completion's token ids (their count is the length).
        row: Unused.
        max_tokens: ``L_max``: usually ``rollout.max_tokens``.
        buffer: ``L_cache``: the length of the punishment interval.

    Returns:
        The penalty, in [-1, 0].

    Raises:
        ValueError: ``buffer`` is not in [1, max_tokens].
    """
    if not 1 <= buffer <= max_tokens:
        raise ValueError(
            f"buffer={buffer} must be in [1, max_tokens={max_tokens}]; pass "
            "reward.kwargs.overlong_penalty.buffer within it"
        )
    length = len(completion_ids)
    free = max_tokens - buffer
    if length <= free:
        return 0.0
    if length <= max_tokens:
        return (free - length) / buffer
    return -1.0
