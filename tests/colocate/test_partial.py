"""The partial-rollout buffer (pure): groups in flight across hand-overs, none lost.

A simulated engine (no vLLM) finishes each request after its own drawn length, a few tokens
per round, and stops as ``EngineTenant.rollout`` does: once its quota of groups is complete
and every group it must finish is.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colocate.algorithms.partial import RolloutBuffer
from colocate.core.config import ConfigError, Pipeline, PipelineConfig, StalenessPolicy
from colocate.core.contract import PartialRequest

pytestmark = pytest.mark.fast


def _engine(lengths: dict, per_step: int):
    """A simulated engine: request (g, s) needs ``lengths[(g, s)]`` tokens, ``per_step`` a step."""

    def rollout(requests, groups, finish, version):
        state = {(r.group, r.sample): r for r in requests}
        members = {}
        for key in state:
            members.setdefault(key[0], []).append(key)

        def enough():
            done = {g for g, ks in members.items() if all(state[k].done for k in ks)}
            return len(done) >= groups and finish <= done | (finish - members.keys())

        while not all(r.done for r in state.values()) and not enough():
            for key, r in state.items():
                if r.done:
                    continue
                n = min(per_step, lengths[key] - len(r.token_ids))
                spans = r.spans
                if spans and spans[-1][0] == version:
                    spans = (*spans[:-1], (version, spans[-1][1] + n))
                else:
                    spans = (*spans, (version, n))
                state[key] = dataclasses.replace(
                    r,
                    prompt_token_ids=r.prompt_token_ids or (1,),
                    token_ids=r.token_ids + (7,) * n,
                    logprobs=r.logprobs + (-1.0,) * n,
                    spans=spans,
                    finish_reason="stop" if len(r.token_ids) + n >= lengths[key] else None,
                )
        return list(state.values())

    return rollout


def _run(buffer, engine, steps: int, batch: int, engines: int = 2):
    """``steps`` train steps of ``batch`` groups; each step bumps the weight version."""
    batches = []
    for version in range(1, steps + 1):
        buffer.add([f"prompt {version}.{i}" for i in range(max(batch, buffer.wanted()))])
        buffer.fill(
            version,
            version - 1,  # one sync per step: version v carries step v - 1
            engines,
            batch,
            lambda plan, v=version: [
                engine(list(reqs), quota, plan.finish, v)
                for reqs, quota in zip(plan.requests, plan.quotas, strict=True)
                if reqs
            ],
        )
        batches.append(buffer.take(batch))
        acc = buffer.accounting()
        assert acc["issued"] == sum(v for k, v in acc.items() if k != "issued"), acc
    return batches


def _lengths(seed: int, groups: int, n: int, tail: float) -> dict:
    rng = random.Random(seed)
    return {
        (g, s): 40 if rng.random() < tail else rng.randint(1, 6)
        for g in range(groups + 64)
        for s in range(n)
    }


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 6),
    extra=st.integers(0, 6),
    staleness=st.integers(1, 3),
    per_step=st.integers(1, 5),
)
def test_wait_policy_keeps_every_group_and_bounds_staleness(
    seed, batch, extra, staleness, per_step
):
    n, steps = 2, 8
    buffer = RolloutBuffer(n, batch + extra, staleness, StalenessPolicy.WAIT)
    engine = _engine(_lengths(seed, (steps + 1) * (batch + extra), n, 0.2), per_step)
    batches = _run(buffer, engine, steps, batch)
    assert all(len(b) == batch * n for b in batches)  # whole groups, as many as asked
    assert not buffer.dropped
    for b in batches:
        for c in b:
            assert c.weight_versions[-1][0] - c.weight_versions[0][0] <= staleness
            assert buffer.staleness(c.weight_versions) <= staleness
            assert sum(k for _, k in c.weight_versions) == len(c.token_ids) == len(c.logprobs)
        groups = {c.prompt_index for c in b}
        assert all(sum(c.prompt_index == g for c in b) == n for g in groups)


def test_groups_outlive_a_step_and_the_long_tail_never_blocks():
    """With more groups in flight than a batch, a step returns before the tail finishes."""
    n, batch = 2, 4
    lengths = _lengths(3, 40, n, 0.25)
    buffer = RolloutBuffer(n, 2 * batch, 3, StalenessPolicy.WAIT)
    batches = _run(buffer, _engine(lengths, 2), 6, batch)
    spans = [len(c.weight_versions) for b in batches for c in b]
    assert max(spans) > 1  # some completions were carried over a hand-over
    assert buffer.accounting()["in_flight"] > 0  # and some still are


def test_drop_policy_drops_and_counts_stale_groups():
    buffer = RolloutBuffer(1, 4, 1, StalenessPolicy.DROP)
    lengths = {(g, 0): 200 if g == 0 else 2 for g in range(40)}
    _run(buffer, _engine(lengths, 1), 5, 2, engines=1)
    assert buffer.dropped["stale"] >= 1


def test_snapshot_restores_every_request_as_json():
    buffer = RolloutBuffer(2, 6, 2)
    _run(buffer, _engine(_lengths(1, 40, 2, 0.3), 2), 3, 2)
    data = json.loads(json.dumps(buffer.snapshot()))
    again = RolloutBuffer(2, 6, 2)
    again.restore(data)
    assert again.started == buffer.started and again.queued == buffer.queued
    assert again.accounting() == buffer.accounting()


def test_partial_request_spans():
    r = PartialRequest(0, 0, (1,), spans=((3, 2), (4, 1)), token_ids=(5, 6, 7))
    assert r.oldest_version == 3 and not r.done


def test_partial_config_is_checked():
    assert PipelineConfig(Pipeline.PARTIAL, 2, 8).in_flight_groups == 8
    with pytest.raises(ConfigError, match="in_flight_groups=None.*fix"):
        PipelineConfig(mode="partial")
    with pytest.raises(ConfigError, match="in_flight_groups=4: only mode='partial'"):
        PipelineConfig(in_flight_groups=4)
    with pytest.raises(ConfigError, match="staleness_policy='never'"):
        PipelineConfig("partial", in_flight_groups=4, staleness_policy="never")


def test_a_version_sent_again_without_a_step_ages_nothing():
    """recover() and resume() re-send the trainer's weights: a new version, the same step."""
    buffer = RolloutBuffer(1, 4, 1, StalenessPolicy.WAIT)
    lengths = {(g, 0): 100 if g == 0 else 2 for g in range(40)}
    engine = _engine(lengths, 1)
    buffer.add(["a", "b", "c", "d"])
    for version in (1, 2, 3, 4):  # all at step 0: three re-sends
        plan = buffer.dispatch(version, 0, 1, 1)
        assert not plan.finish
        for reqs in plan.requests:
            buffer.absorb(engine(list(reqs), 1, plan.finish, version))
    assert not buffer.dropped and 0 in buffer.started
    assert buffer.staleness(buffer.started[0][0].spans) == 0
