"""AgentConfig: each bad field is refused in the driver (field, value and fix in the message),
good configs pass, and the environment factory loads from a class or a ``module:attr`` name."""

from __future__ import annotations

import math

import pytest

from colocate.agents import AgentConfig, ObservationFormat, load_factory
from colocate.core.config import ConfigError
from colocate.testing.tool_task import LatencyEnv, LookupEnv

pytestmark = pytest.mark.fast

ENV = "colocate.testing.tool_task:LookupEnv"


def refused(field: str, value, **kwargs) -> str:
    """The ConfigError message of ``AgentConfig(field=value)``, checked to name both and a fix."""
    kwargs.setdefault("env", LookupEnv)
    with pytest.raises(ConfigError) as info:
        AgentConfig(**{**kwargs, field: value})
    message = str(info.value)
    assert f"AgentConfig.{field}={value!r}" in message
    assert "fix:" in message
    return message


@pytest.mark.parametrize(
    "spec",
    ["colocate.testing.tool_task", 42, None, ""],
)
def test_env_not_a_factory_name(spec):
    assert "not an environment factory" in refused("env", spec)


@pytest.mark.parametrize(
    "spec, error",
    [
        ("colocate.no_such_module_xyz:Env", "no module named 'colocate.no_such_module_xyz'"),
        ("colocate.testing.tool_task:LookupEnv:x", "no module named"),
        ("colocate.testing.tool_task:NoSuchEnv", "has no attribute 'NoSuchEnv'"),
        ("no_such_file.py:Env", "no file"),
    ],
)
def test_env_not_importable(spec, error):
    message = refused("env", spec)
    assert error in message


def test_env_from_a_file_is_loaded_by_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(
        "from colocate.testing.tool_task import LookupEnv\n\nclass Mine(LookupEnv):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    config = AgentConfig("my_envs.py:Mine")
    assert config.env == f"{tmp_path / 'my_envs.py'}:Mine"  # the engine actors' cwd differs
    assert config.factory().__name__ == "Mine"


def test_env_module_found_on_the_given_path(tmp_path):
    (tmp_path / "agent_cfg_env_mod.py").write_text(
        "from colocate.testing.tool_task import LatencyEnv as Env\n"
    )
    assert AgentConfig("agent_cfg_env_mod:Env", path=(str(tmp_path),)).factory().__name__ == (
        "LatencyEnv"
    )


def test_env_not_callable():
    assert "is not callable" in refused("env", "colocate.testing.tool_task:__all__")


@pytest.mark.parametrize("value", [[("latency_s", 1.0)], "latency_s=1", None])
def test_env_kwargs_not_a_dict(value):
    assert "must be a dict" in refused("env_kwargs", value)


@pytest.mark.parametrize("field", ["max_turns", "step_workers"])
@pytest.mark.parametrize("value", [0, -1, True, False, 1.5, "2", None])
def test_counts_below_one_or_not_int(field, value):
    assert "must be an int >= 1" in refused(field, value)


@pytest.mark.parametrize("field", ["turn_tokens", "max_context"])
@pytest.mark.parametrize("value", [0, -3, True, 2.0, "8"])
def test_token_limits_below_one_or_not_int(field, value):
    assert "must be None or an int >= 1" in refused(field, value)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.nan, math.inf, True, "30", None])
def test_step_timeout_not_positive_finite(value):
    assert "must be a finite number > 0" in refused("step_timeout_s", value)


@pytest.mark.parametrize("value", ["xml", "", 3, None])
def test_observation_format_unknown(value):
    message = refused("observation", value)
    assert "text, chat" in message


@pytest.mark.parametrize("field", ["error_message", "timeout_message"])
@pytest.mark.parametrize("value", ["{oops}", "{0}", "error: {error", 5])
def test_messages_with_unknown_fields(field, value):
    message = refused(field, value)
    assert "{error} and {seconds}" in message


def test_timeout_message_with_a_bad_format_spec():
    assert "is not a format string" in refused("timeout_message", "after {seconds:d} s")


def test_defaults_pass():
    agent = AgentConfig(env=LookupEnv)
    assert agent.observation is ObservationFormat.TEXT
    assert agent.turn_tokens is None and agent.max_context is None
    assert agent.factory() is LookupEnv


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_turns": 1, "turn_tokens": 1, "max_context": 1, "step_workers": 1},
        {"step_timeout_s": 1},  # an int is seconds too
        {"step_timeout_s": 0.001},
        {"error_message": "failed", "timeout_message": "too slow"},  # no fields at all
        {"error_message": "{error}{error}", "timeout_message": "{seconds:.1f}s {seconds}"},
        {"env_kwargs": {"latency_s": 0.5, "reveal": 2}},
    ],
)
def test_good_configs_pass(kwargs):
    agent = AgentConfig(env=LookupEnv, **kwargs)
    for name, value in kwargs.items():
        assert getattr(agent, name) == value


@pytest.mark.parametrize("value", ["chat", ObservationFormat.CHAT])
def test_observation_format_from_its_value(value):
    assert AgentConfig(env=LookupEnv, observation=value).observation is ObservationFormat.CHAT


def test_string_factory_loads_and_makes_an_environment():
    agent = AgentConfig(env=ENV, env_kwargs={"reveal": 2})
    assert agent.factory() is LookupEnv
    env = agent.factory()(**agent.env_kwargs)
    assert isinstance(env, LookupEnv) and env.reveal == 2


def test_load_factory_passes_callables_through():
    def make():
        return LatencyEnv(turns=1)

    assert load_factory(make) is make
    assert load_factory(LatencyEnv) is LatencyEnv
    assert load_factory("colocate.testing.tool_task:LatencyEnv") is LatencyEnv
