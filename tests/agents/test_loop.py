"""AgentLoop.run on a fake ``LLMEngine``: the exact tokens and masks of each episode, turns
interleaving with slow environment steps, failing and hanging steps, the episode limits, and
the pause at the hand-over with its resume under newer weights.

The fake engine is deterministic: every step it emits one token per running request, the
token and its log-prob being functions of the token's position in the sequence, so that what
the loop records can be checked position by position. It honours ``max_tokens``,
``stop_token_ids``; a step may take time (``step_s``), and a request may emit nothing in its
first steps (``prefill``: as a long prompt's, or a request queued behind others in vLLM).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from colocate.agents import AgentConfig, Environment, EpisodeStart, StepResult, Turn
from colocate.agents.episode import Stage
from colocate.agents.loop import AgentLoop
from colocate.algorithms.losses import make_batch
from colocate.core.config import Sampling

pytestmark = pytest.mark.fast

STOP = 3  # the stop token
OBS = 40  # observation tokens are OBS + turn index (sampled tokens are >= 100)


def token_at(pos: int, period: int) -> int:
    """The fake model's token at sequence position ``pos``: STOP ends every ``period``."""
    return STOP if pos % period == period - 1 else 100 + pos % 800


def logprob_at(pos: int) -> float:
    return -(pos + 1) / 1000


# ----- the fake engine ------------------------------------------------------------------------


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: list
    logprobs: list | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    finished: bool
    outputs: list


@dataclass
class Request:
    prompt: list
    params: object
    waits: int = 0
    generated: list = field(default_factory=list)


class FakeEngine:
    """A deterministic stand-in for vLLM's ``LLMEngine`` (DELTA outputs).

    Args:
        periods: The first prompt token -> the period of the stop token in that sequence
            (absent: no stop token within any test's lengths).
        step_s: Seconds one step takes.
        prefill: The first prompt token -> steps a request of that sequence emits nothing.
    """

    def __init__(self, periods=None, step_s=0.0, prefill=None):
        self.periods = periods or {}
        self.step_s = step_s
        self.prefill = prefill or {}
        self.requests: dict[str, Request] = {}
        self.added: list[tuple[str, list]] = []
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, request_id, prompt, params):
        assert request_id not in self.requests and params.n == 1
        ids = list(prompt["prompt_token_ids"])
        self.requests[request_id] = Request(ids, params, self.prefill.get(ids[0], 0))
        self.added.append((request_id, list(prompt["prompt_token_ids"])))

    def step(self):
        self.steps += 1
        time.sleep(self.step_s)
        outs = []
        for rid, r in list(self.requests.items()):
            if r.waits > 0:
                r.waits -= 1
                continue
            pos = len(r.prompt) + len(r.generated)
            tok = token_at(pos, self.periods.get(r.prompt[0], 10**6))
            r.generated.append(tok)
            finish = None
            if tok in (r.params.stop_token_ids or []):
                finish = "stop"
            elif len(r.generated) >= r.params.max_tokens:
                finish = "length"
            lp = [{tok: Logprob(logprob_at(pos))}] if r.params.logprobs is not None else None
            outs.append(
                RequestOutput(rid, finish is not None, [CompletionOutput([tok], lp, finish)])
            )
            if finish is not None:
                del self.requests[rid]
        return outs

    def abort_request(self, request_ids):
        for rid in request_ids:
            self.aborted.append(rid)
            self.requests.pop(rid, None)


# ----- a recording environment ----------------------------------------------------------------

RELEASE = threading.Event()  # lets a hanging step's thread end when its test does


class RecordingEnv(Environment):
    """Plays ``row["turns"]`` turns; records every turn and every observation it returned.

    Row keys: ``prompt`` (token ids), ``turns``, ``latency`` (s, per step), ``obs`` (tokens
    per observation), ``fail`` / ``hang`` (turn indices whose step raises / hangs),
    ``bad`` (turn indices whose step returns a dict).
    """

    def __init__(self, text_obs: bool = False):
        self.text_obs = text_obs

    def reset(self, row):
        self.row = row
        self.turns: list[Turn] = []
        self.observations: dict[int, list] = {}
        self.times: list[tuple[float, float]] = []
        self.closed = False
        return list(row["prompt"])

    def step(self, turn):
        t0 = time.monotonic()
        self.turns.append(turn)
        row = self.row
        time.sleep(row.get("latency", 0.0))
        if turn.index in row.get("fail", ()):
            raise RuntimeError(f"tool failed at {turn.index}")
        if turn.index in row.get("hang", ()):
            RELEASE.wait(20)
        if turn.index in row.get("bad", ()):
            return {"observation": []}
        done = turn.index + 1 >= row.get("turns", 2)
        obs = [] if done else [OBS + turn.index] * row.get("obs", 3)
        self.observations[turn.index] = obs
        self.times.append((t0, time.monotonic()))
        return StepResult(observation=obs, reward=1.0, done=done, info={"steps_seen": 1})

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model

    return AutoTokenizer.from_pretrained(build_tiny_model())


@pytest.fixture
def make_loop(tokenizer):
    loops = []

    def make(max_model_len=4096, **kwargs):
        loop = AgentLoop(AgentConfig(env=RecordingEnv, **kwargs), tokenizer, max_model_len)
        loops.append(loop)
        return loop

    RELEASE.clear()
    yield make
    RELEASE.set()
    for loop in loops:
        loop.close()


SAMPLING = Sampling(max_tokens=16, extra={"stop_token_ids": [STOP]})


def row(first: int, n: int = 4, **kwargs) -> dict:
    """A row whose prompt is ``n`` tokens starting with ``first`` (the engine's period key)."""
    return {"prompt": [first] + [7] * (n - 1), **kwargs}


def starts(*rows, samples: int = 1):
    return [EpisodeStart(g, s, r) for g, r in enumerate(rows) for s in range(samples)]


def check_positions(c, period_of):
    """Every sampled token is the fake's token at its position, with its log-prob (nothing
    lost or duplicated); every observation token has log-prob 0.0."""
    p = len(c.prompt_token_ids)
    period = period_of(c.prompt_token_ids[0])
    for i, (tok, m, lp) in enumerate(zip(c.token_ids, c.loss_mask, c.logprobs, strict=True)):
        if m:
            assert (tok, lp) == (token_at(p + i, period), logprob_at(p + i)), i
        else:
            assert lp == 0.0, i


# ----- exact tokens ---------------------------------------------------------------------------


def test_exact_tokens_masks_and_logprobs(make_loop):
    periods = {20: 5, 21: 7}
    loop = make_loop(max_turns=8)
    engine = FakeEngine(periods)
    eps = loop.start(starts(row(20, turns=3, obs=3), row(21, n=6, turns=2, obs=5), samples=2))
    loop.run(engine, eps, SAMPLING, version=3)
    assert all(e.stage is Stage.DONE for e in eps) and engine.requests == {}
    for e in eps:
        env = e.env
        assert env.closed and len(env.turns) == env.row["turns"]
        res = e.result("")
        c = res.completion
        ids, mask = [], []
        for turn in env.turns:
            assert turn.finish_reason == "stop" and turn.token_ids[-1] == STOP
            assert turn.text == loop.tokenizer.decode(list(turn.token_ids))
            obs = env.observations[turn.index]
            ids += [*turn.token_ids, *obs]
            mask += [1] * len(turn.token_ids) + [0] * len(obs)
        assert list(c.token_ids) == ids and list(c.loss_mask) == mask
        assert list(c.prompt_token_ids) == env.row["prompt"]
        check_positions(c, lambda first: periods[first])
        assert (c.prompt_index, c.sample_index) == e.key
        assert c.weight_version == 3 and c.weight_versions == ((3, len(ids)),)
        assert c.finish_reason == "stop"
        assert res.reward == env.row["turns"]
        assert res.stats["turns"] == env.row["turns"] == res.stats["steps_seen"]
        assert res.stats["sampled_tokens"] == sum(mask)
        assert res.stats["observation_tokens"] == len(mask) - sum(mask)
        assert res.stats["tool_errors"] == res.stats["tool_timeouts"] == 0
        assert len(res.turn_steps) == env.row["turns"]
        assert all(0 <= a <= b for a, b in res.turn_steps)

    batch = make_batch([e.result("").completion for e in eps], pad_id=0)
    for i, e in enumerate(eps):
        c = e.result("").completion
        p, n = len(c.prompt_token_ids), len(c.token_ids)
        row_mask = batch["completion_mask"][i].tolist()
        assert row_mask[:p] == [0.0] * p
        assert row_mask[p : p + n] == [float(m) for m in c.loss_mask]
        assert row_mask[p + n :] == [0.0] * (len(row_mask) - p - n)


def test_each_turn_prompt_is_the_context_so_far(make_loop):
    loop = make_loop()
    engine = FakeEngine({20: 4})
    (e,) = loop.start(starts(row(20, turns=3)))
    loop.run(engine, [e], SAMPLING, version=0)
    prompts = [p for _, p in engine.added]
    assert len(prompts) == 3
    c = e.result("").completion
    full = [*c.prompt_token_ids, *c.token_ids]
    for turn_prompt in prompts:
        assert full[: len(turn_prompt)] == turn_prompt
    assert prompts[0] == e.env.row["prompt"]


# ----- interleaving ---------------------------------------------------------------------------


def test_fast_episodes_finish_while_a_slow_one_is_in_its_first_step(make_loop):
    loop = make_loop(max_turns=8)
    engine = FakeEngine({20: 4, 21: 4})
    fast = row(20, turns=4, latency=0.0)
    slow = row(21, turns=2, latency=0.4)
    eps = loop.start(starts(fast, slow, fast))
    t0 = time.monotonic()
    loop.run(engine, eps, SAMPLING, version=0)
    assert time.monotonic() - t0 < 3
    f1, s, f2 = eps
    for f in (f1, f2):
        assert len(f.env.turns) == 4
        # engine steps: every fast turn finished before the slow episode's second turn began
        assert f.turn_steps[-1][1] <= s.turn_steps[1][0]
        # wall clock: the fast episode's last step ran during the slow one's first step
        slow_first_end = s.env.times[0][1]
        assert f.env.times[-1][1] < slow_first_end
        assert f.env.times[1][0] < slow_first_end  # its later turns were already sampled


def test_turns_of_episodes_share_engine_steps(make_loop):
    loop = make_loop()
    engine = FakeEngine({20: 3}, step_s=0.002)  # 21: no stop token, a turn of max_tokens
    eps = loop.start(starts(row(20, turns=3), row(21, turns=1)))
    loop.run(engine, eps, Sampling(max_tokens=100, extra={"stop_token_ids": [STOP]}), version=0)
    a, b = (e.result("").turn_steps for e in eps)
    # the short turns of one episode run while the other's long first turn is in the engine
    assert a[2][0] < b[0][1]
    assert engine.steps == loop.steps


# ----- failing and hanging steps --------------------------------------------------------------


def test_a_failing_step_becomes_an_error_observation(make_loop, tokenizer):
    loop = make_loop()
    engine = FakeEngine({20: 4})
    (e,) = loop.start(starts(row(20, turns=3, fail=(1,))))
    loop.run(engine, [e], SAMPLING, version=0)
    assert e.stage is Stage.DONE and len(e.env.turns) == 3  # it went on after the error
    res = e.result("")
    assert res.stats["tool_errors"] == 1 and res.stats["tool_timeouts"] == 0
    error = tokenizer.encode("\nerror: RuntimeError: tool failed at 1\n", add_special_tokens=False)
    t = e.env.turns
    want = [*t[0].token_ids, *e.env.observations[0], *t[1].token_ids, *error, *t[2].token_ids]
    assert list(res.completion.token_ids) == want
    mask = [1] * len(t[0].token_ids) + [0] * 3 + [1] * len(t[1].token_ids) + [0] * len(error)
    assert list(res.completion.loss_mask) == mask + [1] * len(t[2].token_ids)
    assert res.reward == 2.0  # the failed step gave none


def test_a_hanging_step_times_out(make_loop, tokenizer):
    loop = make_loop(step_timeout_s=0.2)
    engine = FakeEngine({20: 4})
    eps = loop.start(starts(row(20, turns=3, hang=(0,)), row(20, turns=3)))
    t0 = time.monotonic()
    loop.run(engine, eps, SAMPLING, version=0)
    elapsed = time.monotonic() - t0
    assert elapsed < 2
    hung, other = eps
    res = hung.result("")
    assert res.stats["tool_timeouts"] == 1 and res.stats["tool_errors"] == 0
    assert loop.abandoned == 1
    timeout = tokenizer.encode(
        "\nerror: the tool timed out after 0.2 s\n", add_special_tokens=False
    )
    first = hung.env.turns[0].token_ids
    assert list(res.completion.token_ids[len(first) : len(first) + len(timeout)]) == timeout
    assert hung.stage is Stage.DONE and len(hung.env.turns) == 3
    assert other.result("").stats["tool_timeouts"] == 0


def test_custom_error_and_timeout_messages(make_loop, tokenizer):
    loop = make_loop(
        step_timeout_s=0.1, error_message="[failed: {error}]", timeout_message="[late {seconds}]"
    )
    engine = FakeEngine({20: 4})
    eps = loop.start(starts(row(20, turns=2, fail=(0,)), row(20, turns=2, hang=(0,))))
    loop.run(engine, eps, SAMPLING, version=0)
    texts = [tokenizer.decode(list(e.result("").completion.token_ids)) for e in eps]
    assert "[failed: RuntimeError: tool failed at 0]" in texts[0]
    assert "[late 0.1]" in texts[1]


def test_a_step_returning_something_else_is_a_type_error(make_loop):
    loop = make_loop()
    (e,) = loop.start(starts(row(20, turns=2, bad=(0,))))
    with pytest.raises(TypeError, match="RecordingEnv.step returned dict"):
        loop.run(FakeEngine({20: 4}), [e], SAMPLING, version=0)


# ----- limits ---------------------------------------------------------------------------------


def test_max_turns(make_loop):
    loop = make_loop(max_turns=2)
    (e,) = loop.start(starts(row(20, turns=10)))
    loop.run(FakeEngine({20: 4}), [e], SAMPLING, version=0)
    res = e.result("")
    assert res.stats["turns"] == 2 and res.stats["truncated_turns"] == 1
    assert len(e.env.turns) == 2  # the last turn still went to the environment (its reward)
    t = e.env.turns
    # no observation after the last turn
    assert list(res.completion.token_ids) == [
        *t[0].token_ids,
        *e.env.observations[0],
        *t[1].token_ids,
    ]
    assert res.reward == 2.0


def test_turn_tokens(make_loop):
    loop = make_loop(turn_tokens=5)
    (e,) = loop.start(starts(row(20, turns=2)))  # no stop token: every turn hits its limit
    loop.run(FakeEngine(), [e], SAMPLING, version=0)
    res = e.result("")
    assert [len(t.token_ids) for t in e.env.turns] == [5, 5]
    assert [t.finish_reason for t in e.env.turns] == ["length", "length"]
    assert res.stats["truncated_turn_tokens"] == 2 and res.stats["truncated_context"] == 0
    assert res.completion.finish_reason == "length"


def test_sampling_max_tokens_bounds_a_turn_without_turn_tokens(make_loop):
    loop = make_loop()
    (e,) = loop.start(starts(row(20, turns=1)))
    loop.run(FakeEngine(), [e], Sampling(max_tokens=6), version=0)
    assert [len(t.token_ids) for t in e.env.turns] == [6]


def test_max_context_cuts_an_observation(make_loop):
    # prompt 4 + turn 2 + obs 10 + turn 2 = 18; the next observation has 2 tokens of room
    loop = make_loop(turn_tokens=2, max_context=20)
    (e,) = loop.start(starts(row(20, turns=10, obs=10)))
    loop.run(FakeEngine(), [e], SAMPLING, version=0)
    res = e.result("")
    c = res.completion
    assert len(c.prompt_token_ids) + len(c.token_ids) == 20
    assert res.stats["truncated_context"] == 1 and e.stage is Stage.DONE
    assert list(c.token_ids[-2:]) == [OBS + 1, OBS + 1] and list(c.loss_mask[-2:]) == [0, 0]
    assert len(e.env.turns) == 2


def test_max_context_cuts_a_turn(make_loop):
    loop = make_loop(max_context=10)
    (e,) = loop.start(starts(row(20, turns=3)))
    loop.run(FakeEngine(), [e], SAMPLING, version=0)  # 16 tokens wanted, 6 of room
    res = e.result("")
    assert len(res.completion.token_ids) == 6 and set(res.completion.loss_mask) == {1}
    assert res.stats["truncated_context"] == 1
    assert res.stats["truncated_turn_tokens"] == 0
    assert e.stage is Stage.DONE and e.env.closed


def test_max_model_len_bounds_max_context(make_loop):
    loop = make_loop(max_model_len=12, max_context=100)
    assert loop.max_context == 12


def test_a_prompt_too_long_for_max_context(make_loop):
    loop = make_loop(max_context=8)
    with pytest.raises(ValueError, match="episode 0/0: the prompt has 8 tokens, max_context=8"):
        loop.start(starts(row(20, n=8)))
    loop.start(starts(row(20, n=7)))  # one token of room is enough


def test_an_empty_prompt(make_loop):
    loop = make_loop()
    with pytest.raises(ValueError, match="reset returned an empty prompt"):
        loop.start([EpisodeStart(0, 0, {"prompt": []})])


# ----- pause and resume -----------------------------------------------------------------------


def test_pause_keeps_the_turns_and_resume_finishes_them(make_loop):
    # group 0: turns of 2 tokens; group 1: a first turn of 700 tokens (a stop at position
    # 703), whose steps take long enough that group 0 is done while it runs
    periods = {20: 3, 21: 704}
    sampling = Sampling(max_tokens=1000, extra={"stop_token_ids": [STOP]})
    loop = make_loop(max_turns=8)
    engine = FakeEngine(periods, step_s=0.002)
    rows = [row(20, turns=2), row(21, turns=2)]
    eps = loop.start(starts(*rows, samples=2))
    loop.run(engine, eps, sampling, version=0, groups=1)

    g0, g1 = eps[:2], eps[2:]
    assert all(e.stage is Stage.DONE for e in g0)
    assert not any(e.stage is Stage.DONE for e in g1)
    assert engine.requests == {}  # nothing left running in the engine
    assert len(engine.aborted) == 2
    kept = {}
    for e in g1:
        assert e.stage is Stage.READY and e.env.turns == []
        assert 0 < len(e.turn) and e.ids == e.turn  # the partial first turn is kept
        assert e.spans == ((0, len(e.ids)),)
        assert e.turn_steps[0][1] == -1
        kept[e.key] = list(e.ids)

    engine.step_s = 0.0
    loop.run(engine, g1, sampling, version=1)
    assert engine.requests == {}
    for e in g1:
        assert e.stage is Stage.DONE
        c = e.result("").completion
        first = e.env.turns[0].token_ids
        assert list(first[: len(kept[e.key])]) == kept[e.key]  # the turn went on from them
        ids = []
        for turn in e.env.turns:
            ids += [*turn.token_ids, *e.env.observations[turn.index]]
        assert list(c.token_ids) == ids  # nothing lost, nothing twice
        check_positions(c, lambda first: periods[first])
        assert c.weight_versions == ((0, len(kept[e.key])), (1, len(ids) - len(kept[e.key])))
        assert c.weight_version == 0
        res = e.result("")
        assert len(res.turn_steps) == 2 and all(a <= b for a, b in res.turn_steps)


def test_pause_before_a_queued_turn_produced_a_token(make_loop):
    # group 1's first turn waits in the engine, emits nothing, and is aborted
    loop = make_loop()
    engine = FakeEngine({20: 3, 21: 3}, step_s=0.002, prefill={21: 1000})
    eps = loop.start(starts(row(20, turns=1), row(21, turns=2)))
    loop.run(engine, eps, SAMPLING, version=0, groups=1)
    late = eps[1]
    assert late.stage is Stage.READY and late.ids == [] and engine.requests == {}
    engine.step_s, engine.prefill = 0.0, {}
    loop.run(engine, [late], SAMPLING, version=1)
    res = late.result("")
    assert res.stats["turns"] == 2
    assert len(res.turn_steps) == 2  # the aborted, resumed turn is one turn
    assert all(0 <= a <= b for a, b in res.turn_steps)


def test_pause_settles_the_running_steps(make_loop):
    loop = make_loop()
    engine = FakeEngine({20: 3, 21: 3})
    # group 1's first step is still running when group 0 is done: its result is taken
    eps = loop.start(starts(row(20, turns=1), row(21, turns=3, latency=0.3)))
    loop.run(engine, eps, SAMPLING, version=0, groups=1)
    late = eps[1]
    assert late.stage is Stage.READY and late.future is None
    assert late.mask[-3:] == [0, 0, 0]  # its observation is in, the next turn not yet
    assert engine.requests == {}


@pytest.mark.timeout(10)
def test_more_groups_asked_than_there_are(make_loop):
    loop = make_loop()
    eps = loop.start(starts(row(20, turns=2), row(21, turns=1)))
    loop.run(FakeEngine({20: 3, 21: 3}), eps, SAMPLING, version=0, groups=3)
    assert all(e.stage is Stage.DONE for e in eps)


# ----- async steps ------------------------------------------------------------------------------


class AsyncEnv(RecordingEnv):
    """:class:`RecordingEnv` whose step is a coroutine; ``hang`` turns await far too long."""

    cancelled: list[int] = []  # turn indices whose step was cancelled (class-wide, per test)

    async def step(self, turn):
        import asyncio

        if turn.index in self.row.get("hang", ()):
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                AsyncEnv.cancelled.append(turn.index)
                raise
        await asyncio.sleep(self.row.get("latency", 0.0))
        done = turn.index + 1 >= self.row.get("turns", 2)
        self.turns.append(turn)
        return StepResult(observation=[] if done else [OBS] * 2, reward=1.0, done=done)


def test_an_async_step_runs_on_the_event_loop_and_a_hung_one_is_cancelled(tokenizer):
    AsyncEnv.cancelled.clear()
    loop = AgentLoop(AgentConfig(env=AsyncEnv, step_timeout_s=0.3), tokenizer, 4096)
    try:
        engine = FakeEngine({20: 4})
        rows = [row(20, turns=2, latency=0.05) for _ in range(8)] + [row(20, turns=2, hang=(0,))]
        eps = loop.start(starts(*rows))
        t0 = time.monotonic()
        loop.run(engine, eps, SAMPLING, version=0)
        elapsed = time.monotonic() - t0
        # eight 50 ms steps per turn at once on one event loop thread, one cancelled at 0.3 s
        assert elapsed < 2, elapsed
        assert all(e.stage is Stage.DONE for e in eps)
        assert [e.result("").stats["tool_timeouts"] for e in eps] == [0] * 8 + [1]
        time.sleep(0.1)  # the cancellation reaches the coroutine on the loop's thread
        assert AsyncEnv.cancelled == [0]
    finally:
        loop.close()
