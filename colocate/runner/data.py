"""Prompt data through HF ``datasets``: loading, tokenizing, filtering, the eval split, sampling.

:func:`load_data` turns the recipe's ``data`` section into tokenized prompts, in this order:

1. Load ``data.train`` (a ``.jsonl``/``.json`` file, a ``.parquet`` file, or a directory saved
   by ``Dataset.save_to_disk``) into memory; ``datasets``' cache goes to a temporary directory
   that is removed afterwards, so an edited file is always read afresh and nothing is left in
   the user's home.
2. Tokenize each row's ``data.prompt_key`` column: chat messages (``[{"role", "content"}]``)
   through the tokenizer's chat template with the generation prompt; text through the chat
   template as one user message where there is one and ``data.chat_template`` is true, else
   through the tokenizer with its default special tokens.
3. Load and tokenize ``data.eval`` the same way, or hold ``data.eval_size`` rows of
   ``data.train`` out, chosen by the seed (both parts keep the file's order).
4. Drop the prompts longer than the budget from each part, counting them.

:class:`PromptSampler` then draws row indexes for each step: a seeded permutation per epoch,
epochs chained, its position saved in checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from colocate.runner.schema import DataSection, RecipeError

__all__ = ["PromptData", "PromptSampler", "load_data", "SUFFIXES"]

#: File suffixes :func:`load_data` reads, and the ``datasets`` builder of each.
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_SUFFIX_FIX = "pass a .jsonl, .json or .parquet file, or a directory saved by Dataset.save_to_disk"
# Spawn keys of the seed's streams, so the held-out rows and each epoch's order are independent.
_HOLD_OUT_STREAM = 0
_EPOCH_STREAM = 1


@dataclass
class PromptData:
    """Tokenized prompts and their rows; the lists are aligned (one entry per kept row).

    Attributes:
        rows: Each kept dataset row as a plain dict (all columns; reward functions get it).
        prompt_ids: Token ids of each row's prompt (chat template applied where it is used).
        prompt_text: The prompt as the model sees it (``prompt_ids`` decoded, special tokens
            kept): the reward functions' ``prompt`` argument.
        filtered: Rows dropped because their prompt was longer than the budget.
        source: Where the rows came from (a path, and the hold-out when there is one).
    """

    rows: list[dict] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    prompt_text: list[str] = field(default_factory=list)
    filtered: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.rows)


def load_data(
    section: DataSection, tokenizer: Any, max_prompt_tokens: int, seed: int
) -> tuple[PromptData, PromptData | None]:
    """Loads, tokenizes, splits and filters the prompts (the steps in the module docstring).

    Args:
        section: The recipe's ``data`` section.
        tokenizer: The policy's HF tokenizer.
        max_prompt_tokens: The prompt budget in tokens (``data.max_prompt_tokens``, else
            ``rollout.max_model_len - rollout.max_tokens``; the caller resolves it).
        seed: Seed of the held-out rows (``data.seed``, else the run's seed; the caller
            resolves it).

    Returns:
        ``(train, eval)``; eval is None without ``data.eval`` and ``data.eval_size``.

    Raises:
        RecipeError: A missing file, an unknown format, an unreadable or empty dataset, a
            missing prompt column, a prompt that is neither text nor chat messages, chat
            messages without a chat template, ``data.eval_size`` not below the row count, or
            every prompt of a split over the budget.
    """
    rows = _load_rows("data.train", section.train)
    ids = _tokenize(section, tokenizer, rows, section.train)
    train = _Split(rows, ids, section.train)
    evaluation: _Split | None = None
    if section.eval is not None:
        eval_rows = _load_rows("data.eval", section.eval)
        evaluation = _Split(
            eval_rows, _tokenize(section, tokenizer, eval_rows, section.eval), section.eval
        )
    elif section.eval_size:
        if section.eval_size >= len(rows):
            raise RecipeError(
                "data.eval_size",
                section.eval_size,
                f"holds out every row of data.train={section.train!r} ({len(rows)} rows)",
                f"pass data.eval_size below {len(rows)}, or give data.eval",
            )
        held = _held_out(len(rows), section.eval_size, seed)
        kept = [i for i in range(len(rows)) if i not in held]
        train = _Split(
            [rows[i] for i in kept],
            [ids[i] for i in kept],
            f"{section.train} (less {section.eval_size} held-out rows)",
        )
        evaluation = _Split(
            [rows[i] for i in sorted(held)],
            [ids[i] for i in sorted(held)],
            f"{section.train} ({section.eval_size} rows held out by seed {seed})",
        )
    return (
        _filter(train, tokenizer, max_prompt_tokens),
        None if evaluation is None else _filter(evaluation, tokenizer, max_prompt_tokens),
    )


class PromptSampler:
    """Draws row indexes for each step: a permutation per epoch, epochs chained.

    With ``shuffle``, epoch ``e``'s order is a permutation seeded by ``(seed, e)``, so a run
    with the same seed sees the same order and each epoch a different one; without it, every
    epoch is ``0..size-1``. A step may span the end of one epoch and the start of the next (and
    several epochs when it asks for more than ``size`` rows).

    Args:
        size: Rows to draw from.
        seed: Seed of the permutations.
        shuffle: Permute the rows each epoch.

    Raises:
        ValueError: ``size`` below 1.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise ValueError(f"PromptSampler: size={size}; there must be at least one row")
        self._size = size
        self._seed = seed
        self._shuffle = shuffle
        self._epoch = 0
        self._pos = 0  # next position in the current epoch's order
        self._order = self._epoch_order(0)

    @property
    def epoch(self) -> int:
        """The current epoch, 0-based: that of the last index drawn (0 before any draw).

        The next epoch starts with the first index drawn from it, so after exactly one whole
        epoch this is still 0.
        """
        return self._epoch

    def take(self, n: int) -> list[int]:
        """The next ``n`` row indexes, crossing into the next epochs where needed.

        Raises:
            ValueError: ``n`` below 0.
        """
        if n < 0:
            raise ValueError(f"PromptSampler.take: n={n}; pass n >= 0")
        out: list[int] = []
        while len(out) < n:
            if self._pos == self._size:
                self._epoch += 1
                self._pos = 0
                self._order = self._epoch_order(self._epoch)
            count = min(n - len(out), self._size - self._pos)
            out.extend(self._order[self._pos : self._pos + count])
            self._pos += count
        return out

    def state(self) -> dict:
        """The sampler's position as plain JSON-able values (for checkpoints)."""
        return {
            "size": self._size,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "epoch": self._epoch,
            "position": self._pos,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues exactly where :meth:`state` was taken.

        Raises:
            ValueError: The state is of a sampler with another size, seed or shuffle (the rows
                or their order changed since the checkpoint), or its position is out of range.
        """
        for name, mine in (("size", self._size), ("seed", self._seed), ("shuffle", self._shuffle)):
            if state[name] != mine:
                raise ValueError(
                    f"PromptSampler.restore: the saved {name}={state[name]!r} differs from this "
                    f"sampler's {name}={mine!r}; resume with the data and seed of the saved run"
                )
        epoch, pos = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= pos <= self._size:
            raise ValueError(
                f"PromptSampler.restore: epoch={epoch}, position={pos} is out of range for "
                f"size={self._size}"
            )
        self._epoch, self._pos = epoch, pos
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self._shuffle:
            return list(range(self._size))
        seq = np.random.SeedSequence(self._seed, spawn_key=(_EPOCH_STREAM, epoch))
        return np.random.default_rng(seq).permutation(self._size).tolist()


@dataclass
class _Split:
    """Rows and their prompts' token ids before the budget's filter."""

    rows: list[dict]
    ids: list[list[int]]
    source: str


def _held_out(size: int, count: int, seed: int) -> set[int]:
    """Indexes of ``count`` of ``size`` rows, chosen by ``seed``."""
    seq = np.random.SeedSequence(seed, spawn_key=(_HOLD_OUT_STREAM,))
    return set(np.random.default_rng(seq).choice(size, size=count, replace=False).tolist())


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hides ``datasets``' progress bars (the runner has its own console) and restores them."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_rows(key: str, path: str) -> list[dict]:
    """Reads a dataset into memory as plain dict rows (step 1 of the module docstring)."""
    import datasets

    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise RecipeError(key, path, f"no such file or directory ({full})", _SUFFIX_FIX)
    if os.path.isdir(full):
        what = "a directory saved by Dataset.save_to_disk"

        def load(directory: str, cache_dir: str) -> datasets.Dataset:
            return _load_saved_dir(key, path, directory)
    else:
        suffix = os.path.splitext(full)[1].lower()
        builder = SUFFIXES.get(suffix)
        if builder is None:
            raise RecipeError(key, path, f"unknown format {suffix or '(no suffix)'!r}", _SUFFIX_FIX)
        if os.path.getsize(full) == 0:
            raise RecipeError(key, path, "is empty (0 bytes)", "give a file with rows")
        if builder == "parquet" and _parquet_rows(full) == 0:
            # datasets' Parquet reader fails on a file without rows with an unrelated error.
            raise RecipeError(key, path, "has no rows", "give a dataset with rows")
        what = f"{builder.upper()} ({suffix})"

        def load(file: str, cache_dir: str) -> datasets.Dataset:
            return datasets.load_dataset(
                builder, data_files=file, split="train", keep_in_memory=True, cache_dir=cache_dir
            )

    # A fresh cache directory each time: the data is re-read even when the file was edited in
    # place, and no Arrow cache is left behind in ~/.cache between runs.
    with tempfile.TemporaryDirectory(prefix="colocate-data-") as cache_dir, _quiet_datasets():
        try:
            dataset = load(full, cache_dir)
        except RecipeError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any reader failure is the file's problem
            raise RecipeError(
                key,
                path,
                f"could not be read as {what}: {_root_cause(exc)}",
                f"fix the file, or {_SUFFIX_FIX}",
            ) from exc
        rows = dataset.to_list()
    if not rows:
        raise RecipeError(key, path, "has no rows", "give a dataset with rows")
    return rows


def _parquet_rows(file: str) -> int | None:
    """The row count in a Parquet file's footer (None when there is no readable footer)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(file).num_rows
    except Exception:  # noqa: BLE001 -- the reader's own error is reported after
        return None


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a chain: datasets wraps the reader's in a generic one."""
    while exc.__cause__ is not None or (exc.__context__ and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"


def _load_saved_dir(key: str, path: str, directory: str) -> Any:
    """``load_from_disk``; a saved ``DatasetDict`` gives its ``train`` split."""
    import datasets

    loaded = datasets.load_from_disk(directory, keep_in_memory=True)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            splits = ", ".join(sorted(loaded))
            raise RecipeError(
                key,
                path,
                f"is a saved DatasetDict without a 'train' split (splits: {splits})",
                "save the split you mean as its own Dataset, or name it 'train'",
            )
        loaded = loaded["train"]
    return loaded


def _tokenize(
    section: DataSection, tokenizer: Any, rows: list[dict], source: str
) -> list[list[int]]:
    """Each row's prompt as token ids (step 2 of the module docstring)."""
    key = section.prompt_key
    if key not in rows[0]:
        columns = ", ".join(rows[0]) or "(none)"
        raise RecipeError(
            "data.prompt_key",
            key,
            f"no such column in {source} (columns: {columns})",
            "pass data.prompt_key=COLUMN naming the prompt column",
        )
    templated = section.chat_template and getattr(tokenizer, "chat_template", None) is not None
    out = []
    for index, row in enumerate(rows):
        ids = _prompt_ids(section, tokenizer, templated, row.get(key), index, source)
        if not ids:
            raise RecipeError(
                "data.prompt_key",
                key,
                f"row {index} of {source} has an empty prompt (no tokens)",
                "drop the row or give it a prompt",
            )
        out.append(ids)
    return out


def _filter(split: _Split, tokenizer: Any, budget: int) -> PromptData:
    """Drops the prompts over ``budget``, counting them (step 4 of the module docstring)."""
    data = PromptData(source=split.source)
    for row, ids in zip(split.rows, split.ids, strict=True):
        if len(ids) > budget:
            data.filtered += 1
            continue
        data.rows.append(row)
        data.prompt_ids.append(ids)
        data.prompt_text.append(tokenizer.decode(ids))
    if not data.rows:
        lengths = [len(ids) for ids in split.ids]
        raise RecipeError(
            "data.max_prompt_tokens",
            budget,
            f"every prompt of {split.source} is longer than the budget of {budget} tokens "
            f"(shortest {min(lengths)}, longest {max(lengths)})",
            f"pass data.max_prompt_tokens={min(lengths)} or more (or raise "
            "rollout.max_model_len - rollout.max_tokens), or give shorter prompts",
        )
    return data


def _prompt_ids(
    section: DataSection, tokenizer: Any, templated: bool, prompt: Any, index: int, source: str
) -> list[int]:
    """One prompt's token ids (step 2 of the module docstring)."""
    key = section.prompt_key
    if isinstance(prompt, str):
        if templated:
            return _apply_template(tokenizer, [{"role": "user", "content": prompt}])
        return list(tokenizer(prompt)["input_ids"])
    messages = _as_messages(prompt)
    if messages is None:
        raise RecipeError(
            "data.prompt_key",
            key,
            f"row {index} of {source}: the prompt is neither text nor chat messages "
            f"({type(prompt).__name__}: {str(prompt)[:80]!r})",
            'give each prompt as a string or as a list of {"role": str, "content": str}',
        )
    if templated:
        return _apply_template(tokenizer, messages)
    if not section.chat_template:
        raise RecipeError(
            "data.chat_template",
            False,
            f"the column data.prompt_key={key!r} of {source} holds chat messages, which only a "
            "chat template turns into a prompt",
            "pass data.chat_template=true, or give text prompts",
        )
    raise RecipeError(
        "data.prompt_key",
        key,
        f"the column holds chat messages, but the tokenizer has no chat template ({source})",
        "use a model whose tokenizer has a chat template, or give text prompts",
    )


def _as_messages(prompt: Any) -> list[dict] | None:
    """The prompt as chat messages, or None when it is not a list of {role, content}."""
    if not isinstance(prompt, list) or not prompt:
        return None
    messages = []
    for message in prompt:
        if not isinstance(message, dict):
            return None
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return None
        # Arrow gives every message every key of the column's struct, None where a row had
        # none; templates test keys with "is defined", so the padding must not reach them.
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _apply_template(tokenizer: Any, messages: list[dict]) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])
