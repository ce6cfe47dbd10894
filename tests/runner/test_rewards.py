"""Reward functions without Ray: loading and its refusals, the preflight, the built-ins."""

import math
import sys
import threading

import pytest

from colocate.runner import _reward_worker as worker_module
from colocate.runner.reward_functions import format_regex, math_answer, overlong_penalty
from colocate.runner.reward_specs import check_functions, function_names, load_function
from colocate.runner.rewards import RewardScorer
from colocate.runner.schema import RecipeError, RewardSection

pytestmark = pytest.mark.fast

GOOD = """
def score(prompt, completion, completion_ids, row, bonus=0.0, **_):
    return len(completion_ids) + bonus

def strict(prompt, completion, completion_ids, row):
    return 1.0

def needs(prompt, completion, completion_ids, row, level):
    return float(level)

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def rewards_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(GOOD)
    (tmp_path / "broken.py").write_text("import math\nraise RuntimeError('no config here')\n")
    (tmp_path / "needs_missing.py").write_text("import surely_not_a_module_xyz\n")
    yield tmp_path
    for name in ("my_rewards", "needs_missing", "broken"):
        sys.modules.pop(name, None)


def _refusal(spec):
    with pytest.raises(RecipeError) as info:
        load_function(spec, "reward.functions[1]")
    return str(info.value)


def test_loads_a_module_function_and_a_file_function(rewards_file):
    assert load_function("my_rewards:score", "k")(
        prompt="p", completion="c", completion_ids=[1, 2], row={}
    ) == pytest.approx(2.0)
    fn = load_function("my_rewards.py:score", "k")
    assert fn(prompt="p", completion="c", completion_ids=[1, 2, 3], row={}, bonus=1) == 4.0
    # The file is loaded once per process under a name of its own, not as `my_rewards`.
    assert fn.__module__.startswith("_colocate_reward_my_rewards_")
    assert load_function(str(rewards_file / "my_rewards.py") + ":score", "k") is fn
    assert load_function("colocate.runner.reward_functions:math_answer", "k") is math_answer


def test_load_refusals_name_the_key_the_spec_and_the_problem(rewards_file):
    message = _refusal("no_such_module_abc:score")
    assert message.startswith("reward.functions[1]='no_such_module_abc:score': no module named")
    assert "fix: install the package" in message

    message = _refusal("missing/rewards.py:score")
    assert "no file" in message and str(rewards_file / "missing" / "rewards.py") in message

    message = _refusal("broken.py:score")
    assert "raised RuntimeError: no config here" in message

    # A module that exists but whose own import fails is not reported as missing.
    message = _refusal("needs_missing:score")
    assert "importing needs_missing raised ModuleNotFoundError" in message
    assert "surely_not_a_module_xyz" in message

    message = _refusal("my_rewards:nope")
    assert "has no attribute 'nope'" in message and "needs, score, strict" in message

    message = _refusal("my_rewards.py:NOT_A_FUNCTION")
    assert "is not callable (it is of type int)" in message


def _section(functions, kwargs=None, **more):
    return RewardSection(functions=functions, kwargs=kwargs or {}, **more)


def test_check_functions_returns_names_and_disambiguates_repeats(rewards_file):
    section = _section(
        ["my_rewards:score", "my_rewards.py:score", "my_rewards:strict"],
        kwargs={"score#2": {"bonus": 2.0}},
    )
    assert check_functions(section) == ["score", "score#2", "strict"]
    assert function_names(["a:f", "b.py:f", "c:g", "d:f"]) == ["f", "f#2", "g", "f#3"]


def test_check_functions_refuses_kwargs_of_no_function(rewards_file):
    with pytest.raises(RecipeError) as info:
        check_functions(_section(["my_rewards:score"], kwargs={"scroe": {"bonus": 1}}))
    assert str(info.value).startswith("reward.kwargs.scroe={'bonus': 1}: names no reward function")
    assert "(the functions: score)" in str(info.value)


def test_check_functions_refuses_what_the_call_would_refuse(rewards_file):
    with pytest.raises(RecipeError) as info:
        check_functions(_section(["my_rewards:strict"], kwargs={"strict": {"level": 1}}))
    message = str(info.value)
    assert message.startswith("reward.functions[0]='my_rewards:strict': cannot be called")
    assert "level" in message and "reward.kwargs.strict" in message

    with pytest.raises(RecipeError) as info:
        check_functions(_section(["my_rewards:needs"]))
    assert "missing a required argument: 'level'" in str(info.value)
    assert check_functions(_section(["my_rewards:needs"], kwargs={"needs": {"level": 2}}))

    with pytest.raises(RecipeError) as info:
        check_functions(_section(["my_rewards:score"], kwargs={"score": {"row": {}}}))
    assert str(info.value).startswith("reward.kwargs.score.row={}: is one of the arguments")

    with pytest.raises(RecipeError) as info:
        check_functions(_section(["my_rewards:score"], kwargs={"score": 3}))
    assert "must be a mapping" in str(info.value)


def test_check_functions_reports_the_first_spec_that_does_not_load(rewards_file):
    with pytest.raises(RecipeError) as info:
        check_functions(_section(["my_rewards:score", "broken.py:score"]))
    assert info.value.key == "reward.functions[1]"


def test_the_scorer_makes_file_paths_absolute_before_any_worker_exists(rewards_file):
    section = _section(
        ["my_rewards.py:score", "my_rewards:strict"],
        kwargs={"score": {"bonus": 1.0}},
        weights=[2.0, 0.5],
    )
    scorer = RewardScorer(section)  # no Ray: nothing starts before start()
    assert scorer._specs == [f"{rewards_file / 'my_rewards.py'}:score", "my_rewards:strict"]
    assert scorer._kwargs == [{"bonus": 1.0}, {}]
    assert (scorer.names, scorer.weights) == (["score", "strict"], [2.0, 0.5])
    assert RewardScorer(_section(["my_rewards:strict"])).weights == [1.0]
    with pytest.raises(ValueError, match="1 names for 2 reward functions"):
        RewardScorer(section, names=["score"])


def test_builtin_specs_pass_the_preflight():
    section = _section(
        [
            "colocate.runner.reward_functions:math_answer",
            "colocate.runner.reward_functions:format_regex",
            "colocate.runner.reward_functions:overlong_penalty",
        ],
        kwargs={
            "format_regex": {"pattern": r"\\boxed\{.+\}"},
            "overlong_penalty": {"max_tokens": 16, "buffer": 4},
        },
    )
    assert check_functions(section) == ["math_answer", "format_regex", "overlong_penalty"]


def test_return_values_are_checked():
    check = worker_module.check_value
    assert check(1) == ("ok", 1.0, {})
    assert check(True) == ("ok", 1.0, {})
    assert check({"score": 0.5, "len": 3}) == ("ok", 0.5, {"len": 3.0})
    assert check(float("nan"))[0] == "non_finite"
    assert check({"score": 1.0, "ratio": float("inf")}) == ("non_finite", "ratio = inf")
    assert check(None) == ("bad_type", "returned NoneType, not a number or a dict with a 'score'")
    assert check("1.0")[0] == "bad_type"
    assert check({"len": 3})[0] == "bad_type"
    assert check({"score": 1.0, "note": "x"}) == ("bad_type", "'note' is str, not a number")


def _math(completion, answer):
    return math_answer(prompt="", completion=completion, completion_ids=[], row={"answer": answer})


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is 42.", 42, 1.0),
        ("The answer is 42.", "42", 1.0),
        (r"So the result is $\boxed{42}$.", r"\boxed{42}", 1.0),
        (r"The answer is \boxed{42}. Also 7.", "42", 1.0),  # the boxed answer wins
        ("I think 41, no 43", "43", 1.0),  # else the last number
        ("The answer is 0.5", "1/2", 1.0),
        (r"$\frac{1}{2}$", 0.5, 1.0),
        ("It is 42.0", "42", 1.0),
        ("The answer is 43.", "42", 0.0),
        ("no number at all", "42", 0.0),
        ("", "42", 0.0),
    ],
)
def test_math_answer(completion, answer, expected):
    assert _math(completion, answer) == expected


def test_math_answer_works_in_a_thread_and_names_a_missing_column():
    out = []
    thread = threading.Thread(target=lambda: out.append(_math(r"\boxed{7}", "7")))
    thread.start()
    thread.join(timeout=30)
    assert out == [1.0]
    row = {"question": "q", "gold": "7"}
    with pytest.raises(KeyError, match="no 'answer' column .*question, gold"):
        math_answer(prompt="", completion="7", completion_ids=[], row=row)
    args = dict(prompt="", completion="7", completion_ids=[], row=row)
    assert math_answer(**args, answer_key="gold") == 1.0


def test_format_regex_searches_across_lines():
    args = dict(prompt="", completion_ids=[], row={})
    assert format_regex(completion="reasoning\n\\boxed{3}", pattern=r"\\boxed\{.+\}", **args) == 1
    assert format_regex(completion="<think>a\nb</think>", pattern="<think>.+</think>", **args) == 1
    assert format_regex(completion="no box", pattern=r"\\boxed\{.+\}", **args) == 0.0
    assert format_regex(completion="x 42", pattern=r"^\d+$", **args) == 0.0


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0), (100, -1.0)],
)
def test_overlong_penalty_follows_dapo(length, expected):
    got = overlong_penalty(
        prompt="", completion="", completion_ids=[0] * length, row={}, max_tokens=16, buffer=4
    )
    assert got == expected and math.isfinite(got)


def test_overlong_penalty_refuses_a_buffer_out_of_range():
    with pytest.raises(ValueError, match="buffer=0 must be in"):
        overlong_penalty(
            prompt="", completion="", completion_ids=[], row={}, max_tokens=8, buffer=0
        )
