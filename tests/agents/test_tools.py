"""Tool calls: the default ``<tool_call>{json}</tool_call>`` parser and its refusals, and
ToolEnvironment: a call runs its tool, an unknown tool is named with the known ones, a turn
without a call is the final answer scored with the calls made, and the parser hook."""

from __future__ import annotations

import json
import re

import pytest

from colocate.agents import StepResult, ToolCall, ToolEnvironment, Turn, parse_tool_call
from colocate.agents.tools import ToolError

pytestmark = pytest.mark.fast


def call(name, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def turn(text: str, index: int = 0) -> Turn:
    return Turn(index=index, token_ids=(1, 2, 3), text=text, finish_reason="stop")


# ----- parse_tool_call -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "the answer is 4", "<tool_call>", "</tool_call>{}"])
def test_no_call(text):
    assert parse_tool_call(text) is None


def test_a_call():
    text = 'I will look it up. <tool_call>{"name": "lookup", "arguments": {"key": "x"}}</tool_call>'
    assert parse_tool_call(text) == ToolCall("lookup", {"key": "x"})


def test_whitespace_and_newlines_around_and_inside_the_body():
    text = (
        'thinking\n<tool_call>\n  {"name": "add",\n   "arguments": {"a": 1,\n "b": 2}}'
        "\n\n</tool_call>\n"
    )
    assert parse_tool_call(text) == ToolCall("add", {"a": 1, "b": 2})


def test_arguments_default_to_none_given():
    assert parse_tool_call('<tool_call>{"name": "now"}</tool_call>') == ToolCall("now", {})


def test_the_first_of_two_calls():
    assert parse_tool_call(call("a", x=1) + call("b", x=2)) == ToolCall("a", {"x": 1})


@pytest.mark.parametrize(
    "body, problem",
    [
        ("{name: lookup}", "not JSON"),
        ('{"name": "lookup", "arguments": {"key": }}', "not JSON"),
        ("", "not JSON"),
        ('{"arguments": {"key": "x"}}', '"name"'),
        ('{"name": 7, "arguments": {}}', '"name"'),
        ('["lookup", {"key": "x"}]', '"name"'),
        ('"lookup"', '"name"'),
        ('{"name": "lookup", "arguments": ["x"]}', "arguments must be a JSON object"),
        ('{"name": "lookup", "arguments": "key=x"}', "arguments must be a JSON object"),
        ('{"name": "lookup", "arguments": null}', "arguments must be a JSON object"),
    ],
)
def test_malformed_calls(body, problem):
    with pytest.raises(ToolError, match=re.escape(problem)):
        parse_tool_call(f"<tool_call>{body}</tool_call>")


# ----- ToolEnvironment -----------------------------------------------------------------------


def _boom():
    raise RuntimeError("the service is down")


class Calculator(ToolEnvironment):
    """Two tools; the final answer scores 1 when right, plus 0.1 per call made."""

    tools = {"add": lambda a, b: a + b, "boom": _boom}

    def score(self, row, answer, calls):
        self.scored = (row, answer, list(calls))
        return float(answer.text.strip() == row["answer"]) + 0.1 * len(calls)


ROW = {"prompt": "what is 2 + 3?", "answer": "5"}


def test_reset_returns_the_prompt_field_or_the_row():
    env = Calculator()
    assert env.reset(ROW) == "what is 2 + 3?"
    assert env.reset("a bare prompt") == "a bare prompt"


def test_prompt_key():
    class Keyed(Calculator):
        prompt_key = "question"

    assert Keyed().reset({"question": "q?", "prompt": "not this"}) == "q?"


def test_a_call_runs_the_tool_and_returns_its_result():
    env = Calculator()
    env.reset(ROW)
    result = env.step(turn("let me add " + call("add", a=2, b=3)))
    assert result == StepResult("<tool_response>5</tool_response>", info={"tool_calls": 1.0})
    assert not result.done and result.reward == 0.0
    assert env.calls == [ToolCall("add", {"a": 2, "b": 3})]


def test_result_format():
    class Named(Calculator):
        result_format = "[{name} -> {result}]"

    env = Named()
    env.reset(ROW)
    assert env.step(turn(call("add", a=1, b=1))).observation == "[add -> 2]"


def test_an_unknown_tool_names_the_known_ones():
    env = Calculator()
    env.reset(ROW)
    with pytest.raises(ToolError, match=re.escape("unknown tool 'search' (tools: add, boom)")):
        env.step(turn(call("search", q="x")))
    assert env.calls == []


def test_no_tools_at_all():
    class Bare(ToolEnvironment):
        def score(self, row, answer, calls):
            return 0.0

    env = Bare()
    env.reset(ROW)
    with pytest.raises(ToolError, match=re.escape("(tools: none)")):
        env.step(turn(call("add")))


def test_a_failing_tool_raises_out_of_step():
    env = Calculator()
    env.reset(ROW)
    with pytest.raises(RuntimeError, match="the service is down"):
        env.step(turn(call("boom")))


def test_a_malformed_call_raises_out_of_step():
    env = Calculator()
    env.reset(ROW)
    with pytest.raises(ToolError, match="not JSON"):
        env.step(turn("<tool_call>{add}</tool_call>"))


def test_the_final_answer_is_scored_with_the_calls_made():
    env = Calculator()
    env.reset(ROW)
    env.step(turn(call("add", a=2, b=3), index=0))
    env.step(turn(call("add", a=0, b=5), index=1))
    answer = turn(" 5 ", index=2)
    result = env.step(answer)
    assert result.done and result.observation == ""
    assert result.reward == pytest.approx(1.2)
    row, scored_answer, calls = env.scored
    assert row is ROW and scored_answer is answer
    assert calls == [ToolCall("add", {"a": 2, "b": 3}), ToolCall("add", {"a": 0, "b": 5})]


def test_a_wrong_final_answer_without_calls():
    env = Calculator()
    env.reset(ROW)
    result = env.step(turn("4"))
    assert result.done and result.reward == 0.0
    assert env.scored[2] == []


def test_reset_forgets_the_previous_calls():
    env = Calculator()
    env.reset(ROW)
    env.step(turn(call("add", a=1, b=2)))
    env.reset(ROW)
    assert env.calls == []


def test_the_parser_hook():
    class Plain(Calculator):
        """Calls written as ``CALL name a b``."""

        def parse(self, text):
            words = text.split()
            if words[:1] != ["CALL"]:
                return None
            return ToolCall(words[1], {"a": int(words[2]), "b": int(words[3])})

    env = Plain()
    env.reset(ROW)
    assert env.step(turn("CALL add 4 1")).observation == "<tool_response>5</tool_response>"
    # the default format is no call for this parser: the final answer
    result = env.step(turn(call("add", a=1, b=1)))
    assert result.done and env.scored[2] == [ToolCall("add", {"a": 4, "b": 1})]


def test_score_must_be_implemented():
    class Unscored(ToolEnvironment):
        tools = {}

    env = Unscored()
    env.reset(ROW)
    with pytest.raises(NotImplementedError, match="Unscored must implement score"):
        env.step(turn("done"))
