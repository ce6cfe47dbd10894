"""Text observations to tokens, through the engine's own tokenizer (and its chat template).

Only observations and prompts are encoded here; the model's tokens are never re-encoded.
With the chat template, a new message's tokens are the template's rendering of a short
conversation with the message minus its rendering without it: the turn boundaries (the role
header, the generation prompt) are the template's, whatever the model family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from colocate.agents.config import ObservationFormat
from colocate.core.errors import InputError

__all__ = ["ObservationEncoder"]

# A conversation the new message is rendered after: its tokens are cut off again.
_BEFORE = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]


class ObservationEncoder:
    """Encodes prompts and observations for one tokenizer.

    Args:
        tokenizer: The engine's (a Hugging Face tokenizer).
        fmt: Plain text or the chat template.
        role: The chat role of an observation.
    """

    def __init__(self, tokenizer: Any, fmt: ObservationFormat, role: str = "tool"):
        self.tokenizer = tokenizer
        self.fmt = ObservationFormat(fmt)
        self.role = role
        if self.fmt is ObservationFormat.CHAT and not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "AgentConfig.observation='chat' but the model's tokenizer has no chat "
                "template; fix: use observation='text', or a model with a chat template"
            )

    def prompt(self, observation: Any) -> list[int]:
        """The first observation's tokens (the prompt)."""
        if _is_ids(observation):
            return _ids(observation)
        if self.fmt is ObservationFormat.TEXT:
            return list(self.tokenizer.encode(_text(observation)))
        messages = observation if isinstance(observation, list) else None
        messages = messages or [{"role": "user", "content": _text(observation)}]
        return self._template(messages, generation=True)

    def observation(self, observation: Any) -> list[int]:
        """An observation's tokens (empty for an empty one)."""
        if _is_ids(observation):
            return _ids(observation)
        text = _text(observation)
        if not text:
            return []
        if self.fmt is ObservationFormat.TEXT:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        before = self._template(_BEFORE, generation=False)
        after = self._template([*_BEFORE, {"role": self.role, "content": text}], generation=True)
        if after[: len(before)] != before:
            raise InputError(
                "the chat template renders an earlier conversation differently once a message "
                "follows it, so an observation's tokens cannot be cut out; fix: use "
                "AgentConfig.observation='text' or return token ids from the environment"
            )
        return after[len(before) :]

    def _template(self, messages: list, generation: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=True
        )
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _ids(value: Sequence[int]) -> list[int]:
    return [int(t) for t in value]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(
            f"observation {value!r:.80}: an environment returns text or a list of token ids"
        )
    return value
