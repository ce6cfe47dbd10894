"""The reward scorer on a real local Ray: weights, extras, each error reason, on_error, a hung
call abandoned after its timeout, a dead worker, the workers replaced and shut down."""

import time

import pytest
import ray

from colocate.runner.reward_specs import check_functions
from colocate.runner.rewards import RewardError, RewardItem, RewardScorer
from colocate.runner.schema import OnError, RewardSection

pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 2.0

MODULE = """
import os
import re
import time


def length(prompt, completion, completion_ids, row, **_):
    return float(len(completion_ids))


def rich(prompt, completion, completion_ids, row, scale=1.0, **_):
    out = {"score": scale * len(completion), "chars": float(len(completion))}
    if len(completion) % 2:
        out["odd"] = 1.0
    return out


def flaky(prompt, completion, completion_ids, row, **_):
    mode = row.get("mode", "ok")
    if mode == "raise":
        raise ValueError(f"cannot score row {row['i']}")
    if mode == "hang":
        time.sleep(60)
    if mode == "nan":
        return float("nan")
    if mode == "text":
        return "high"
    if mode == "die":
        os._exit(3)
    return 0.5


def greedy(prompt, completion, completion_ids, row, **_):
    # Catastrophic backtracking: the regex engine holds the GIL for longer than the run.
    return 0.0 if re.match(r"(a|aa)+$", "a" * 80 + "b") else 1.0
"""


@pytest.fixture(scope="module")
def module_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "ray_rewards.py"
    path.write_text(MODULE)
    return str(path)


def _section(module_path, on_error=OnError.ZERO, workers=2, functions=None):
    functions = functions or [
        f"{module_path}:length",
        f"{module_path}:rich",
        f"{module_path}:flaky",
        "colocate.runner.reward_functions:math_answer",
    ]
    return RewardSection(
        functions=functions,
        weights=[1.0, 0.5, 2.0, 3.0][: len(functions)],
        kwargs={"rich": {"scale": 2.0}} if len(functions) == 4 else {},
        timeout_s=TIMEOUT_S,
        workers=workers,
        on_error=on_error,
    )


@pytest.fixture(scope="module")
def scorer(ray_local_module, module_path):
    section = _section(module_path)
    s = RewardScorer(section, check_functions(section))
    s.start()
    yield s
    s.shutdown()


def _item(i, mode="ok", completion="The answer is 4", answer="4"):
    return RewardItem(
        "2+2?", completion, tuple(range(i + 1)), {"i": i, "mode": mode, "answer": answer}
    )


def _expected_total(item, flaky=0.5, math=1.0):
    return len(item.completion_ids) + 0.5 * 2.0 * len(item.completion) + 2.0 * flaky + 3.0 * math


def test_totals_are_the_weighted_sum_and_dict_returns_are_logged(scorer):
    items = [_item(0), _item(1, completion="It is 5"), _item(2), _item(3, completion="x")]
    scores = scorer.score(items)
    assert scores.errors == {} and scores.failed == set()
    assert scores.per_function["math_answer"] == [1.0, 0.0, 1.0, 0.0]
    assert scores.per_function["length"] == [1.0, 2.0, 3.0, 4.0]
    assert scores.total == pytest.approx(
        [_expected_total(it, math=m) for it, m in zip(items, [1, 0, 1, 0], strict=True)]
    )
    assert scores.extra == {
        "rich/chars": [15.0, 7.0, 15.0, 1.0],
        "rich/odd": [1.0, 1.0, 1.0, 1.0],
    }
    assert scorer.score([]).total == []


def test_errors_are_counted_by_function_and_reason_and_zeroed(scorer):
    items = [_item(0, "raise"), _item(1, "nan"), _item(2, "text"), _item(3)]
    scores = scorer.score(items)
    assert scores.errors == {"flaky/raised": 1, "flaky/non_finite": 1, "flaky/bad_type": 1}
    assert scores.failed == {0, 1, 2}
    assert scores.per_function["flaky"] == [0.0, 0.0, 0.0, 0.5]
    assert scores.total == pytest.approx(
        [_expected_total(it, flaky=f) for it, f in zip(items, [0, 0, 0, 0.5], strict=True)]
    )
    assert scores.messages["flaky/raised"] == "ValueError: cannot score row 0"


def test_a_hung_call_costs_its_timeout_and_its_worker_is_replaced(scorer):
    before = scorer.replacements
    items = [_item(0), _item(1, "hang"), _item(2), _item(3)]
    scores = scorer.score(items)
    assert TIMEOUT_S <= scores.seconds < TIMEOUT_S + 8  # not the 60 s the call sleeps
    assert scores.errors == {"flaky/timeout": 1}
    assert scores.failed == {1}
    assert scores.per_function["length"] == [1.0, 2.0, 3.0, 4.0]
    assert scorer.replacements == before + 1
    again = scorer.score([_item(i) for i in range(4)])
    assert again.errors == {}
    assert again.total == pytest.approx([_expected_total(_item(i)) for i in range(4)])


def test_a_dead_worker_loses_its_chunk_as_timeouts_and_is_replaced(scorer):
    before = scorer.replacements
    scores = scorer.score([_item(0, "die"), _item(1), _item(2), _item(3)])
    # The worker of items 0 and 1 died: every function of both counts a timeout.
    assert scores.errors == {
        f"{name}/timeout": 2 for name in ("length", "rich", "flaky", "math_answer")
    }
    assert scores.failed == {0, 1}
    assert "worker lost" in scores.messages["length/timeout"]
    assert scores.per_function["length"] == [0.0, 0.0, 3.0, 4.0]
    assert scorer.replacements == before + 1
    assert scorer.score([_item(i) for i in range(4)]).errors == {}


def test_a_call_holding_the_gil_is_bounded_by_the_driver(ray_local_module, module_path):
    # The worker's thread cannot even wait out the timeout: the driver's bound on the chunk
    # (timeout_s per item plus the margin) gives up on it and replaces the worker.
    section = RewardSection(
        functions=[f"{module_path}:greedy", f"{module_path}:length"],
        timeout_s=1.0,
        workers=1,
        on_error=OnError.ZERO,
    )
    s = RewardScorer(section, margin_s=1.0)
    try:
        s.start()
        scores = s.score([_item(0)])
        assert 2.0 <= scores.seconds < 6.0
        assert scores.errors == {"greedy/timeout": 1, "length/timeout": 1}
        assert "no result within 2 s" in scores.messages["greedy/timeout"]
        assert s.replacements == 1
    finally:
        s.shutdown()


def test_fail_names_the_row_the_function_and_the_reason(ray_local_module, module_path):
    section = _section(module_path, OnError.FAIL, workers=1, functions=[f"{module_path}:flaky"])
    s = RewardScorer(section)
    try:
        pending = s.submit([_item(0), _item(1, "raise"), _item(2, "nan")])
        with pytest.raises(RewardError) as info:
            pending.result()
        message = str(info.value)
        assert message.startswith(f"reward function flaky ({module_path}:flaky) on row 1: raised:")
        assert "ValueError: cannot score row 1" in message
        assert "flaky/non_finite=1, flaky/raised=1" in message
        assert "reward.on_error=zero" in message
        assert (info.value.row, info.value.function, info.value.reason) == (1, "flaky", "raised")
        with pytest.raises(RewardError):
            pending.result()
    finally:
        s.shutdown()


def test_drop_reports_the_failed_items_and_shutdown_kills_the_workers(
    ray_local_module, module_path
):
    section = _section(module_path, OnError.DROP, workers=1, functions=[f"{module_path}:flaky"])
    s = RewardScorer(section)
    s.start()
    scores = s.score([_item(0), _item(1, "nan"), _item(2)])
    assert scores.failed == {1}
    assert scores.errors == {"flaky/non_finite": 1}
    handles = [slot.handle for slot in s._slots]
    pending = s.submit([_item(0)])
    s.shutdown()
    s.shutdown()
    # Collected after the shutdown: scored, or lost with the worker; nothing restarts.
    assert pending.result().errors in ({}, {"flaky/timeout": 1})
    assert s._slots == [] and s.replacements == 0
    for handle in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.ready.remote(), timeout=30)


def test_a_worker_that_cannot_load_the_functions_fails_start(ray_local_module, tmp_path):
    # Loads in the driver (the check), then the file is gone before the workers load it.
    path = tmp_path / "vanishing.py"
    path.write_text("def f(prompt, completion, completion_ids, row):\n    return 1.0\n")
    section = RewardSection(functions=[f"{path}:f"], workers=1)
    check_functions(section)
    path.unlink()
    s = RewardScorer(section)
    started = time.monotonic()
    with pytest.raises(RewardError, match="could not load the functions: .*no file"):
        s.start()
    assert time.monotonic() - started < 30
