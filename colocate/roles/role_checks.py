"""Driver-side checks of a role's model directory, before any actor starts.

They read only the local files (``config.json``, the tokenizer): nothing about hardware.
"""

from __future__ import annotations

import json
from pathlib import Path

from colocate.core.config import ConfigError

__all__ = ["check_model_dir", "check_same_vocabulary", "check_single_score_head"]


def check_model_dir(field: str, path: str) -> dict:
    """The ``config.json`` of the local HF directory ``path``; raises naming ``field``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"{field}={path!r}: no config.json there; fix: pass a local HF model directory "
            "(nothing is downloaded)"
        )
    return json.loads(config.read_text())


def check_same_vocabulary(field: str, path: str, policy_model: str) -> None:
    """Raises unless ``path`` has the policy's vocabulary size and tokenizer vocabulary.

    A role scores the policy's token ids: with another tokenizer the ids mean other tokens.
    """
    from transformers import AutoTokenizer

    if Path(path).resolve() == Path(policy_model).resolve():
        return
    mine = check_model_dir(field, path).get("vocab_size")
    theirs = check_model_dir("TrainerConfig.model", policy_model).get("vocab_size")
    if mine != theirs:
        raise ConfigError(
            f"{field}={path!r}: vocab_size {mine} differs from the policy's {theirs} "
            f"({policy_model}); fix: use a model built with the policy's tokenizer"
        )
    try:
        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the same refusal
        raise ConfigError(
            f"{field}={path!r}: its tokenizer cannot be read ({type(exc).__name__}: {exc}); "
            "fix: save the policy's tokenizer into that directory"
        ) from None
    policy = AutoTokenizer.from_pretrained(policy_model).get_vocab()
    if vocab != policy:
        differ = sorted(set(vocab.items()) ^ set(policy.items()))[:1]
        raise ConfigError(
            f"{field}={path!r}: its tokenizer differs from the policy's (first difference: "
            f"{differ}); fix: save the policy's tokenizer into that directory"
        )


def check_single_score_head(field: str, path: str) -> None:
    """Raises unless ``path`` is a sequence-classification model with one output (a score)."""
    config = check_model_dir(field, path)
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(
            f"{field}={path!r}: architectures {archs} has no *ForSequenceClassification "
            "model; fix: save a sequence-classification model with num_labels=1"
        )
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise ConfigError(
            f"{field}={path!r}: the head has {labels} outputs, a reward model needs one score "
            "per sequence; fix: num_labels=1"
        )
    if config.get("pad_token_id") is None:
        raise ConfigError(
            f"{field}={path!r}: config.json has no pad_token_id (the score is read at the last "
            "token, found through padding); fix: set pad_token_id to the tokenizer's pad id"
        )
