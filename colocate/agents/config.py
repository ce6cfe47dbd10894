"""The agent loop's configuration: which environment, and the limits of an episode."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from colocate.core.config import ConfigError

__all__ = ["AgentConfig", "ObservationFormat", "load_factory"]


class ObservationFormat(enum.StrEnum):
    """How a text observation (and a text prompt) becomes tokens.

    ``TEXT``: the tokenizer's ``encode`` (the prompt with the tokenizer's special tokens, an
    observation without). ``CHAT``: the chat template's tokens for a new message (the prompt
    as a ``user`` message with the generation prompt; an observation as a message of
    ``AgentConfig.observation_role`` followed by the generation prompt), so that the turn
    boundaries are the template's own.
    """

    TEXT = "text"
    CHAT = "chat"


def load_factory(spec: str | Callable, path: tuple[str, ...] = ()) -> Callable:
    """The environment factory ``spec`` names, or the callable itself.

    ``"package.module:Name"`` is imported (each directory of ``path`` appended to
    ``sys.path`` first); ``"path/to/file.py:Name"`` is loaded from the file. The loader is the
    one reward functions use (``colocate.runner._reward_worker.load``).

    Raises:
        ConfigError: Not of that form, not importable, or not callable.
    """
    from colocate.runner import _reward_worker as loader

    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(
            f"AgentConfig.env={spec!r}: not an environment factory; fix: pass a class or "
            "callable, 'package.module:Name' or 'path/to/file.py:Name'"
        )
    for directory in path:
        loader.add_to_path(directory)
    try:
        return loader.load(spec)
    except loader.LoadError as exc:
        raise ConfigError(f"AgentConfig.env={spec!r}: {exc.problem}; fix: {exc.fix}") from None


@dataclass(frozen=True)
class AgentConfig:
    """An agent loop: the environment and the limits of each episode.

    Attributes:
        env: The environment factory: a class or callable taking ``**env_kwargs`` and
            returning an :class:`~colocate.agents.environment.Environment`, or
            ``"package.module:Name"`` or ``"path/to/file.py:Name"`` (loaded in the engine
            actors; checked in the driver). A relative file path is made absolute here.
        env_kwargs: Passed to the factory for every episode.
        max_turns: Model turns per episode; an episode not done after them ends, counted as
            ``truncated_turns``.
        turn_tokens: Tokens per model turn (None: ``Sampling.max_tokens``); a turn that hits
            it has ``finish_reason="length"``, counted as ``truncated_turn_tokens``.
        max_context: Tokens of the whole episode, prompt and observations included (None: the
            engine's ``max_model_len``). An observation that does not fit is cut, and the
            episode ends, counted as ``truncated_context``.
        step_timeout_s: Bound on one ``reset``/``step`` call; one that outlives it becomes a
            timeout observation (``timeout_message``), counted as ``tool_timeouts``.
        step_workers: Worker threads running environment steps, per engine.
        observation: How text observations are tokenized.
        observation_role: The chat role of an observation (``ObservationFormat.CHAT``).
        error_message: The observation for a step that raised (``{error}`` is the error).
        timeout_message: The observation for a step that timed out (``{seconds}``).
        path: Directories appended to ``sys.path`` before ``env`` is imported, in the driver
            and in the engine actors (the runner passes the directory it was started in).
    """

    env: str | Callable
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 4
    turn_tokens: int | None = None
    max_context: int | None = None
    step_timeout_s: float = 30.0
    step_workers: int = 32
    observation: ObservationFormat = ObservationFormat.TEXT
    observation_role: str = "tool"
    error_message: str = "\nerror: {error}\n"
    timeout_message: str = "\nerror: the tool timed out after {seconds:g} s\n"
    path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", tuple(self.path))
        load_factory(self.env, self.path)  # a bad name fails in the driver, before any actor
        if isinstance(self.env, str):
            module, _, name = self.env.rpartition(":")
            if module.endswith(".py") and not os.path.isabs(module):  # the actors' cwd differs
                object.__setattr__(self, "env", f"{os.path.abspath(module)}:{name}")
        if not isinstance(self.env_kwargs, dict):
            raise _err("env_kwargs", self.env_kwargs, "must be a dict", "pass a dict")
        for name, low in (("max_turns", 1), ("step_workers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _err(name, value, f"must be an int >= {low}", f"pass an int >= {low}")
        for name in ("turn_tokens", "max_context"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise _err(name, value, "must be None or an int >= 1", "pass an int >= 1")
        t = self.step_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise _err("step_timeout_s", t, "must be a finite number > 0", "pass seconds > 0")
        object.__setattr__(self, "observation", _format(self.observation))
        for name in ("error_message", "timeout_message"):
            try:
                getattr(self, name).format(error="e", seconds=1.0)
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise _err(
                    name,
                    getattr(self, name),
                    f"is not a format string ({exc})",
                    "use only the fields {error} and {seconds}",
                ) from exc

    def factory(self) -> Callable:
        """The environment factory (imported if named by a string)."""
        return load_factory(self.env, self.path)


def _format(value: Any) -> ObservationFormat:
    try:
        return ObservationFormat(value)
    except ValueError:
        choices = ", ".join(f.value for f in ObservationFormat)
        raise _err("observation", value, "is not a format", f"pass one of {choices}") from None


def _err(name: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"AgentConfig.{name}={value!r}: {problem}; fix: {fix}")
