"""Multi-turn, tool-using rollouts: token-in-token-out agent loops on the colocated engines.

A user's :class:`Environment` (``reset(row)``, ``step(turn)``) runs one episode; the engine
actors run many at once, each at its own pace (:class:`AgentLoop`), and
``Coordinator.run_episodes`` returns them as completions whose ``loss_mask`` is 0 on the
observation tokens. :class:`ToolEnvironment` is an environment made of tools and a tool-call
parser. See ``docs/agents.md``.
"""

from colocate.agents.config import AgentConfig, ObservationFormat, load_factory
from colocate.agents.environment import Environment, Observation, StepResult, Turn
from colocate.agents.episode import STAT_KEYS, EpisodeResult, EpisodeStart
from colocate.agents.loop import AgentLoop
from colocate.agents.tools import ToolCall, ToolEnvironment, parse_tool_call

__all__ = [
    "AgentConfig",
    "AgentLoop",
    "Environment",
    "EpisodeResult",
    "EpisodeStart",
    "Observation",
    "ObservationFormat",
    "STAT_KEYS",
    "StepResult",
    "ToolCall",
    "ToolEnvironment",
    "Turn",
    "load_factory",
    "parse_tool_call",
]
