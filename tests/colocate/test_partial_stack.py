"""Partial rollouts on the real stack (vLLM CPU, DeepSpeed ZeRO-3, Ray, two shared GPUs).

One run, sleep level 2 (the engines drop their weights and KV cache at every hand-over), a
reference role scoring each batch: groups outlive steps with their kept tokens, no request is
lost when an engine dies mid-rollout, and a resumed run continues the groups in flight at the
checkpoint from their kept tokens.
"""

from __future__ import annotations

import pytest

from colocate import (
    ActorFailedError,
    Coordinator,
    EngineConfig,
    Fault,
    PipelineConfig,
    ReferenceActor,
    Sampling,
    TrainerConfig,
    grpo_loss,
    make_grpo_batch,
    reference_role,
)
from placement import TopologySpec

pytestmark = pytest.mark.timeout(900)
N, BATCH = 2, 4
# ~1 token in 28 stops a completion of the untrained model: lengths from 1 to the maximum
SAMPLING = Sampling(n=N, max_tokens=48, extra={"stop_token_ids": list(range(3, 40))})


def _step(coord, prompts_made: list) -> list:
    first = len(prompts_made)
    prompts = [f"kato rimu {first + i}" for i in range(coord.rollouts.wanted())]
    prompts_made.extend(prompts)
    completions = coord.generate(prompts, SAMPLING, groups=BATCH)
    batch = make_grpo_batch(completions, [len(c.token_ids) / 48 for c in completions], N, 0)
    batch["ref_logprobs"] = coord.call_role("reference", ReferenceActor.logprobs, batch)
    coord.train(batch)
    coord.sync()
    return completions


def _book(coord) -> dict:
    """Every request the driver holds, by (group, sample): its kept tokens."""
    buffer = coord.rollouts.buffer
    return {(r.group, r.sample): r.token_ids for rs in buffer.started.values() for r in rs}


def test_partial_rollouts_survive_hand_overs_engine_death_and_resume(
    ray_local, tiny_model_dir, tmp_path
):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    coord = Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir, log_level="ERROR"),
        TrainerConfig(model=tiny_model_dir, lr=1e-3),
        grpo_loss,
        sleep_level=2,
        pipeline=PipelineConfig("partial", max_staleness=2, in_flight_groups=2 * BATCH),
        roles=[reference_role(tiny_model_dir)],
    )
    made: list = []
    with coord:
        seen = []
        for _ in range(4):
            seen += _step(coord, made)
            stats = coord.rollouts.stats
            assert stats["max_staleness"] <= 2 and stats["dropped"] == 0
            acc = {k: stats[k] for k in ("queued", "in_flight", "complete", "dropped", "returned")}
            assert stats["issued"] == sum(acc.values()), stats
        assert len(seen) == 4 * BATCH * N
        for c in seen:
            assert sum(k for _, k in c.weight_versions) == len(c.token_ids) == len(c.logprobs)
            assert len(c.prompt_token_ids) + len(c.token_ids) <= 512
            assert len(c.token_ids) <= SAMPLING.max_tokens
        assert any(len(c.weight_versions) > 1 for c in seen)  # carried over a hand-over

        # A checkpoint with groups in flight: saved with their kept tokens.
        ckpt = coord.save_trainer(str(tmp_path / "ckpt"))
        snapshot, version = coord.rollouts.snapshot(), coord.weight_version
        kept = _book(coord)
        assert any(kept.values())  # some requests hold tokens across the checkpoint

        # An engine dies mid-rollout: the failed round leaves the book as it was.
        before = _book(coord)
        coord.inject_fault("engine1", Fault.CRASH_IN_GENERATE)
        with pytest.raises(ActorFailedError):
            coord.generate([], SAMPLING, groups=BATCH)
        assert _book(coord).keys() >= before.keys()  # nothing lost
        coord.recover()
        got = _step(coord, made)
        returned = {(c.prompt_index, c.sample_index): c.token_ids for c in got}
        for key, tokens in before.items():  # re-issued from its kept tokens, never restarted
            now = returned.get(key, _book(coord).get(key))
            assert now is not None and now[: len(tokens)] == tokens, key

        # resume() brings the trainer back; the book goes back to the checkpoint's.
        coord.resume(ckpt, version)
        coord.rollouts.restore(snapshot)
        assert _book(coord) == kept
        got = _step(coord, made)
        for c in got:
            tokens = kept.get((c.prompt_index, c.sample_index))
            if tokens is not None:
                assert c.token_ids[: len(tokens)] == tokens
        oldest = min(g for g, _ in kept)
        assert oldest in {c.prompt_index for c in got}  # the oldest groups come back first
        timeline = coord.timeline
    assert timeline.ordering_violations() == []
