"""An environment made of tools: the model calls them by text, the final answer is scored.

The default tool-call format (:func:`parse_tool_call`) is the one many chat models are
trained on: a JSON object between ``<tool_call>`` and ``</tool_call>``::

    <tool_call>{"name": "lookup", "arguments": {"key": "x"}}</tool_call>

A turn with a call runs the tool and shows the model its result (``result_format``); a turn
without one is the final answer, scored by :meth:`ToolEnvironment.score`. Subclasses set
``tools`` and ``score`` and may replace :meth:`ToolEnvironment.parse` (the parser hook). A tool
that raises, or an unknown tool, raises out of ``step``: the agent loop gives the error to
the model as an observation and counts it (``tool_errors``), and bounds every step by
``AgentConfig.step_timeout_s`` (``tool_timeouts``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from colocate.agents.environment import Environment, StepResult, Turn

__all__ = ["ToolCall", "ToolError", "ToolEnvironment", "parse_tool_call"]

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


class ToolError(Exception):
    """A call the environment cannot run (unknown tool, malformed call)."""


def parse_tool_call(text: str) -> ToolCall | None:
    """The first ``<tool_call>{json}</tool_call>`` of ``text``; None when there is none.

    Raises:
        ToolError: A call whose body is not a JSON object with a string ``name`` and an
            object ``arguments``.
    """
    match = _CALL.search(text)
    if match is None:
        return None
    try:
        body = json.loads(match.group(1))
    except json.JSONDecodeError as exc:
        raise ToolError(f"the tool call is not JSON ({exc.msg})") from None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise ToolError('a tool call is {"name": "...", "arguments": {...}}')
    arguments = body.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ToolError("the tool call's arguments must be a JSON object")
    return ToolCall(body["name"], arguments)


class ToolEnvironment(Environment):
    """An environment whose actions are tool calls and a final answer.

    Subclasses set :attr:`tools` and implement :meth:`score`.

    Attributes:
        tools: Tool name -> callable taking the call's arguments as keywords; its return
            value (``str()``) is the observation.
        prompt_key: The dataset row's field that is the prompt.
        result_format: The observation of a tool's result (``{name}``, ``{result}``).
    """

    tools: dict[str, Callable] = {}
    prompt_key: str = "prompt"
    result_format: str = "<tool_response>{result}</tool_response>"

    def reset(self, row: Any) -> Any:
        """Keeps ``row`` (the scorer reads it) and returns its prompt."""
        self.row = row
        self.calls: list[ToolCall] = []
        return row[self.prompt_key] if isinstance(row, dict) else row

    def parse(self, text: str) -> ToolCall | None:
        """The parser hook: the tool call in a turn's text, or None (the final answer)."""
        return parse_tool_call(text)

    def step(self, turn: Turn) -> StepResult:
        """Runs the turn's tool call, or scores the turn as the final answer."""
        call = self.parse(turn.text)
        if call is None:
            return StepResult(reward=float(self.score(self.row, turn, self.calls)), done=True)
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            raise ToolError(f"unknown tool {call.name!r} (tools: {known})")
        self.calls.append(call)
        result = tool(**call.arguments)
        observation = self.result_format.format(name=call.name, result=result)
        return StepResult(observation, info={"tool_calls": 1.0})

    def score(self, row: Any, answer: Turn, calls: list[ToolCall]) -> float:
        """The final answer's reward (``calls``: the tool calls the episode made)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")
