"""Agent episodes on the real stack (Ray with two shared logical GPUs, vLLM CPU, DeepSpeed).

One SYNC coordinator serves the tests of one call each (exact tokens and masks through a train
step and a sync; failing and hanging tools; the context limit; turns of episodes interleaving);
the PARTIAL hand-over runs on a coordinator of its own, first, and is shut down before the
SYNC one starts. The environments are ``colocate.testing.tool_task``'s: an engine actor
imports them by name.
"""

from __future__ import annotations

import time

import pytest

from colocate import (
    Coordinator,
    EngineConfig,
    PipelineConfig,
    Sampling,
    TrainerConfig,
    grpo_loss,
    make_batch,
    make_grpo_batch,
)
from colocate.agents import AgentConfig, ObservationFormat
from colocate.agents.encoding import ObservationEncoder
from colocate.core.errors import ActorFailedError
from colocate.core.faults import Fault
from colocate.testing.tool_task import FaultyToolEnv, LookupEnv, PacedEnv
from placement import TopologySpec

pytestmark = pytest.mark.timeout(900)
SPEC = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
TARGETS = [11, 42, 97, 130, 211, 305, 377, 402, 510, 733]
WORDS = ("kato", "rimu", "sela", "ponu", "vari", "nemo", "tuli", "basa")


def _prompt(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))


def _coordinator(model_dir: str, **kw) -> Coordinator:
    return Coordinator(
        SPEC,
        EngineConfig(model=model_dir, log_level="ERROR"),
        TrainerConfig(model=model_dir, lr=1e-3),
        grpo_loss,
        **kw,
    )


def _engines(coord) -> dict:
    return {n: s for n, s in coord.actor_status().items() if n.startswith("engine")}


def _assert_engines_idle(coord, paused: int = 0) -> None:
    """No request runs in any engine; ``paused`` episodes wait in them, all told."""
    engines = _engines(coord)
    assert len(engines) == SPEC.engines, engines
    assert all(s["unfinished_requests"] == 0 for s in engines.values()), engines
    assert sum(s["episodes_paused"] for s in engines.values()) == paused, engines


def _runs(mask) -> list[tuple[int, int]]:
    """(mask value, run length) of the loss mask's runs, in order."""
    runs: list[list[int]] = []
    for m in mask:
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return [tuple(r) for r in runs]


def _grpo(results, n: int, pad_id: int) -> dict:
    completions = [r.completion for r in results]
    return make_grpo_batch(completions, [r.reward for r in results], n, pad_id)


# ----- PARTIAL: the hand-over with episodes in flight -----------------------------------------


def test_partial_episodes_pause_across_the_hand_over_and_resume(ray_local, tiny_model_dir):
    """Four groups on two engines, one wanted: one whole group comes back, the others wait
    (paused in the engines, or finished and kept by the driver) through a train step and a
    sync (the engines sleep and wake), then come back, each group once, each episode whole;
    the long episodes were cut mid-turn and go on under the new weights."""
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    # The short groups end on a tool call that outlasts the long ones' tool calls (instant):
    # by then the long episodes are in their next turn, far from their end.
    short = {"turns": 1, "latency_s": 0.02}
    long = {"turns": 8, "latency_s": 0.0}
    rows = [{"prompt": _prompt(i), **(short if i < 2 else long)} for i in range(4)]
    turns = {i: row["turns"] for i, row in enumerate(rows)}
    agent = AgentConfig(PacedEnv, max_turns=8)
    sampling = Sampling(n=2, max_tokens=24, extra={"ignore_eos": True})
    pipeline = PipelineConfig("partial", in_flight_groups=8)
    with _coordinator(tiny_model_dir, pipeline=pipeline) as coord:
        old = coord.weight_version
        first = coord.run_episodes(rows, agent, sampling, groups=1)
        assert len({r.completion.prompt_index for r in first}) == 1
        assert len(first) == sampling.n
        # groups placed alternately: each engine holds one long group, paused there
        _assert_engines_idle(coord, paused=2 * sampling.n)
        assert coord.rollouts.episodes_held() == 3  # the other short group: on the driver
        assert coord.rollouts.stats["in_flight"] == 3
        # an evaluation meanwhile runs its own episodes to their end, the paused ones untouched
        evaluated = coord.evaluate_episodes(rows[:2], agent, sampling)
        assert [(r.completion.prompt_index, r.stats["turns"]) for r in evaluated] == [
            (0, 1),
            (0, 1),
            (1, 1),
            (1, 1),
        ]
        _assert_engines_idle(coord, paused=2 * sampling.n)
        assert coord.rollouts.episodes_held() == 3

        coord.train(_grpo(first, sampling.n, pad_id))
        coord.sync()  # the engines slept through the train step and woke on new weights
        new = coord.weight_version
        assert new == old + 1
        rest = coord.run_episodes([], agent, sampling, groups=3)
        _assert_engines_idle(coord)
        assert coord.rollouts.episodes_held() == 0
        assert coord.rollouts.stats["partial_fraction"] > 0
        timeline = coord.timeline

        # An engine lost while it holds paused episodes: they are counted as dropped, and the
        # next call returns the groups that are left without waiting for the lost ones.
        more = [{"prompt": _prompt(10 + i), **long} for i in range(4)]
        coord.run_episodes(more, agent, sampling, groups=1)
        holding = [n for n, s in _engines(coord).items() if s["episodes_paused"]]
        assert holding, _engines(coord)
        coord.inject_fault(holding[0], Fault.CRASH_IN_GENERATE)
        with pytest.raises(ActorFailedError):  # every group held: the engines are called
            coord.run_episodes([], agent, sampling, groups=coord.rollouts.episodes_held())
        coord.recover()
        held = coord.rollouts.episodes_held()
        back = coord.run_episodes([], agent, sampling, groups=held)
        assert coord.rollouts.stats["dropped"] >= 1
        assert (
            len({r.completion.prompt_index for r in back}) == held - coord.rollouts.stats["dropped"]
        )
        assert coord.rollouts.episodes_held() == 0
        _assert_engines_idle(coord)

    got = first + rest
    groups = sorted(r.completion.prompt_index for r in got)
    assert groups == [g for g in range(4) for _ in range(sampling.n)]  # each group once, whole
    assert len({(r.completion.prompt_index, r.completion.sample_index) for r in got}) == 8
    resumed = []
    for r in got:
        c, g = r.completion, r.completion.prompt_index
        assert r.stats["turns"] == turns[g], (g, r.stats)  # every episode ran to its end
        assert r.stats["truncated_turns"] == r.stats["truncated_context"] == 0
        assert sum(k for _, k in c.weight_versions) == len(c.token_ids) == len(c.loss_mask)
        assert [v for v, _ in c.weight_versions] in ([old], [new], [old, new]), c.weight_versions
        if len(c.weight_versions) == 2:
            resumed.append(c)
    assert resumed, [(r.completion.prompt_index, r.completion.weight_versions) for r in got]
    assert {c.prompt_index for c in resumed} <= {2, 3}  # the long ones
    mid_turn = []
    for c in resumed:
        cut = c.weight_versions[0][1]  # the first token sampled on the new weights
        if c.loss_mask[cut - 1] == c.loss_mask[cut] == 1:  # the turn went on across the sync
            mid_turn.append(c)
    assert mid_turn, [(c.weight_versions, _runs(c.loss_mask)) for c in resumed]
    # each turn kept its token budget across the pause: 8 turns of 24, 4 tool tokens between
    for c in resumed:
        assert _runs(c.loss_mask) == [(1, 24), (0, 4)] * 7 + [(1, 24)]
    assert timeline.ordering_violations() == []


# ----- SYNC ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(ray_local_module, tiny_model_dir):
    """One SYNC coordinator for this module's tests, and the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with _coordinator(tiny_model_dir) as coord:
        yield coord, tokenizer


def test_episode_tokens_masks_and_versions_go_through_train_and_sync(stack):
    """Prompt, turn 0 (mask 1), the tool's target ids (mask 0, log-prob 0), turn 1 (mask 1);
    the batch rows are exactly those tokens; a train step and a sync later, the next episodes
    carry the new version."""
    coord, tokenizer = stack
    reveal = 4
    agent = AgentConfig(LookupEnv, env_kwargs={"reveal": reveal})
    sampling = Sampling(n=2, max_tokens=8)
    rows = [{"prompt": _prompt(i), "targets": TARGETS} for i in range(4)]
    version = coord.weight_version
    results = coord.run_episodes(rows, agent, sampling)
    _assert_engines_idle(coord)
    base = results[0].completion.prompt_index  # group ids go on over the run
    assert [(r.completion.prompt_index, r.completion.sample_index) for r in results] == [
        (base + g, s) for g in range(4) for s in range(2)
    ]
    for r in results:
        c = r.completion
        assert list(c.prompt_token_ids) == tokenizer.encode(rows[c.prompt_index - base]["prompt"])
        (a, n0), (o, n_obs), (b, n1) = _runs(c.loss_mask)
        assert (a, o, b) == (1, 0, 1) and n_obs == reveal and 1 <= n0 <= 8 and 1 <= n1 <= 8
        assert list(c.token_ids[n0 : n0 + reveal]) == sorted(TARGETS)[:reveal]
        assert len(c.logprobs) == len(c.token_ids)
        assert all(lp == 0.0 for lp, m in zip(c.logprobs, c.loss_mask, strict=True) if not m)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.weight_versions == ((version, len(c.token_ids)),)
        assert c.weight_version == version
        assert r.stats["turns"] == 2 and r.stats["lookups"] == 1
        assert r.stats["observation_tokens"] == reveal
        assert r.stats["sampled_tokens"] == n0 + n1
        hits = sum(t in TARGETS for t in c.token_ids[n0 + reveal :])
        assert r.reward == pytest.approx(hits / n1)
        assert len(r.turn_steps) == 2 and r.turn_steps[0][1] <= r.turn_steps[1][0]

    batch = make_batch([r.completion for r in results], tokenizer.pad_token_id)
    for i, r in enumerate(results):
        c = r.completion
        p, n = len(c.prompt_token_ids), len(c.token_ids)
        assert batch["input_ids"][i, : p + n].tolist() == [*c.prompt_token_ids, *c.token_ids]
        assert batch["attention_mask"][i].sum().item() == p + n
        mask = batch["completion_mask"][i].tolist()
        assert mask == [0.0] * p + [float(m) for m in c.loss_mask] + [0.0] * (len(mask) - p - n)
        old = batch["old_logprobs"][i, p : p + n].tolist()
        assert old == pytest.approx(list(c.logprobs))

    stats = coord.train(_grpo(results, sampling.n, tokenizer.pad_token_id))
    assert "loss" in stats
    coord.sync()
    assert coord.weight_version == version + 1
    again = coord.run_episodes(rows[:2], agent, sampling)
    assert [r.completion.prompt_index for r in again] == [base + 4] * 2 + [base + 5] * 2
    for r in again:
        c = r.completion
        assert c.weight_versions == ((version + 1, len(c.token_ids)),)
    _assert_engines_idle(coord)


def test_failing_and_hanging_tools_become_observations(stack):
    """A tool that raises and one that hangs past ``step_timeout_s``: the call returns at the
    bound, not the hang; each failure is counted and shown to the model (mask 0), and the
    episode goes on to its next turn."""
    coord, tokenizer = stack
    agent = AgentConfig(FaultyToolEnv, env_kwargs={"hang_s": 30.0}, step_timeout_s=1.0)
    sampling = Sampling(n=2, max_tokens=8)
    faults = ["raise", "hang"]  # one row per engine
    rows = [{"prompt": _prompt(i), "fault": f} for i, f in enumerate(faults)]
    start = time.monotonic()
    results = coord.run_episodes(rows, agent, sampling)
    elapsed = time.monotonic() - start
    assert elapsed < 20.0, elapsed  # the hanging call is left behind at its timeout
    _assert_engines_idle(coord)
    encoder = ObservationEncoder(tokenizer, ObservationFormat.TEXT)
    messages = {
        "raise": agent.error_message.format(error="RuntimeError: the lookup service is down"),
        "hang": agent.timeout_message.format(seconds=agent.step_timeout_s),
    }
    assert len(results) == 4
    for r in results:
        c, fault = (
            r.completion,
            faults[r.completion.prompt_index - results[0].completion.prompt_index],
        )
        assert r.stats["tool_errors"] == (fault == "raise")
        assert r.stats["tool_timeouts"] == (fault == "hang")
        assert r.stats["turns"] == 2 and r.stats["env_steps"] == 2
        assert r.reward == 1.0  # the turn after the failure ran, and ended the episode
        (a, n0), (o, n_obs), (b, _) = _runs(c.loss_mask)
        assert (a, o, b) == (1, 0, 1)
        assert list(c.token_ids[n0 : n0 + n_obs]) == encoder.observation(messages[fault])


def test_context_limit_cuts_the_episode(stack):
    """``max_context``: no episode outgrows it; the one that would is cut and counted."""
    coord, tokenizer = stack
    prompt_len = max(len(tokenizer.encode(_prompt(i))) for i in range(2))
    max_context = prompt_len + 18  # room for two turns of 8 and a tool answer of 4, not more
    agent = AgentConfig(PacedEnv, env_kwargs={"turns": 4}, max_context=max_context)
    sampling = Sampling(n=2, max_tokens=8, extra={"ignore_eos": True})
    rows = [{"prompt": _prompt(i), "latency_s": 0.0} for i in range(2)]
    results = coord.run_episodes(rows, agent, sampling)
    _assert_engines_idle(coord)
    assert len(results) == 4
    for r in results:
        c = r.completion
        assert len(c.prompt_token_ids) + len(c.token_ids) <= max_context
        assert r.stats["truncated_context"] == 1, r.stats
        assert r.stats["turns"] < 4 and r.stats["truncated_turns"] == 0
        assert c.finish_reason == "length"


def test_turns_of_episodes_interleave(stack):
    """Episodes of one engine at different paces: the fast ones' later turns are sampled
    while a slow one's tool call still runs, none waits for another's."""
    coord, _ = stack
    fast = {"turns": 3, "latency_s": 0.0}
    slow = {"turns": 2, "latency_s": 1.5}
    paces = [fast, slow, fast, slow]  # groups 0, 1 on engine 0; 2, 3 on engine 1
    rows = [{"prompt": _prompt(i), **pace} for i, pace in enumerate(paces)]
    agent = AgentConfig(PacedEnv)
    sampling = Sampling(n=2, max_tokens=8, extra={"ignore_eos": True})  # turns end together
    results = coord.run_episodes(rows, agent, sampling)
    _assert_engines_idle(coord)
    base = results[0].completion.prompt_index
    by_group: dict[int, list] = {}
    for r in results:
        by_group.setdefault(r.completion.prompt_index - base, []).append(r)
    for f, s in ((0, 1), (2, 3)):  # the groups sharing an engine
        for r in by_group[f] + by_group[s]:
            assert len(r.turn_steps) == rows[r.completion.prompt_index - base]["turns"]
        for quick in by_group[f]:
            for slow_one in by_group[s]:
                tool_from = slow_one.turn_steps[0][1]  # its turn 0 done: its tool call runs
                tool_to = slow_one.turn_steps[1][0]  # its turn 1 submitted: the tool returned
                assert tool_from <= quick.turn_steps[1][0] < tool_to, (
                    quick.turn_steps,
                    slow_one.turn_steps,
                )
