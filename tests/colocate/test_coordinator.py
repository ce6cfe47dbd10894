"""The coordinator on the real stack: 2 logical GPUs, 1 trainer rank + 1 engine on each."""

import pytest

from colocate import (
    ConfigError,
    Coordinator,
    EngineConfig,
    Phase,
    PhaseError,
    Sampling,
    TrainerConfig,
    grpo_loss,
    make_grpo_batch,
)
from placement import TopologySpec

pytestmark = pytest.mark.timeout(900)

SAMPLING = Sampling(n=4, max_tokens=8)
PROMPTS = ["kato rimu", "sena lo", "pe vi da", "mu se"]


def _cycle(coord):
    completions = coord.generate(PROMPTS, SAMPLING)
    rewards = [float(sum(t % 2 for t in c.token_ids)) for c in completions]
    coord.train(make_grpo_batch(completions, rewards, SAMPLING.n, pad_id=2))
    return coord.sync()


def _by_lane_and_handover(timeline, lane):
    out = {}
    for s in timeline.on_lane(lane):
        out.setdefault((s.phase, s.step), {})[s.name] = s
    return out


@pytest.mark.parametrize("level", [1, 2])
def test_every_release_precedes_every_acquisition_per_gpu(ray_local, tiny_model_dir, level):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    with Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir),
        TrainerConfig(model=tiny_model_dir, lr=1e-3),
        grpo_loss,
        sleep_level=level,
    ) as coord:
        assert coord.colocated and coord.phase is Phase.ROLLOUT
        for _ in range(2):
            report = _cycle(coord)
            assert report.verified_tensors == 2 * len(coord.bucket_plan.metas)
        assert coord.weight_version == 3
        timeline = coord.timeline
    assert timeline.ordering_violations() == []
    for lane in (0, 1):
        handovers = _by_lane_and_handover(timeline, lane)
        # The check above is not vacuous: each hand-over holds the release and the acquisition.
        for step in (1, 2):
            train = handovers[("train", step - 1)]
            assert train["engine.sleep"].detail["level"] == level
            assert train["engine.sleep"].end <= train["trainer.reload"].start
            sync = handovers[("sync", step)]
            assert sync["trainer.offload"].end <= sync["engine.wake_weights"].start
            assert sync["engine.wake_weights"].end <= sync["engine.receive_weights"].start
            rollout = handovers[("rollout", step)]
            assert rollout["trainer.offload_params"].end <= rollout["engine.wake_kv"].start
        init = handovers[("init", 0)]
        assert init["engine.sleep"].end <= init["trainer.start"].start
        assert handovers[("start", 0)]["engine.start"].end <= init["engine.sleep"].start


def test_separate_pools_run_the_same_loop_without_memory_steps(ray_local, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=1, engines=1, colocate=False)
    with Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir),
        TrainerConfig(model=tiny_model_dir, lr=1e-3, zero_stage=1),
        grpo_loss,
    ) as coord:
        assert not coord.colocated
        report = _cycle(coord)
        assert report.version == 2 and report.verified_tensors == len(coord.bucket_plan.metas)
        assert {c.weight_version for c in coord.generate(PROMPTS, SAMPLING)} == {2}
        names = {s.name for s in coord.timeline.spans}
    assert "engine.sleep" not in names and "trainer.offload" not in names
    assert {"engine.receive_weights", "trainer.send_weights", "trainer.train_step"} <= names


def test_skip_sync_needs_level_1_and_keeps_the_old_weights(ray_local, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1)
    greedy = Sampling(n=1, max_tokens=12, temperature=0.0)
    with Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir),
        TrainerConfig(model=tiny_model_dir, lr=5e-2, zero_stage=2),
        grpo_loss,
        sleep_level=1,
    ) as coord:
        before = [c.token_ids for c in coord.generate(PROMPTS, greedy)]
        completions = coord.generate(PROMPTS, SAMPLING)
        rewards = [float(c.token_ids[0] % 2) for c in completions]
        coord.train(make_grpo_batch(completions, rewards, SAMPLING.n, pad_id=2))
        with pytest.raises(PhaseError, match="generate needs phase 'rollout'"):
            coord.generate(PROMPTS, greedy)
        coord.skip_sync()
        assert coord.phase is Phase.ROLLOUT and coord.weight_version == 1
        assert [c.token_ids for c in coord.generate(PROMPTS, greedy)] == before
        coord.train(make_grpo_batch(completions, rewards, SAMPLING.n, pad_id=2))
        coord.sync()
        assert [c.token_ids for c in coord.generate(PROMPTS, greedy)] != before
        coord.shutdown()
        with pytest.raises(PhaseError, match="'shutdown'"):
            coord.generate(PROMPTS, greedy)


def _live_actors() -> set[str]:
    """Every actor of this Ray not dead (pending or restarting ones included), by id."""
    from ray._private.state import actors

    return {a for a, info in actors().items() if info["State"] != "DEAD"}


def _reserved_groups() -> set[str]:
    from ray.util.placement_group import placement_group_table

    return {g for g, info in placement_group_table().items() if info["state"] != "REMOVED"}


def test_bad_configuration_fails_before_any_actor(ray_local, tiny_model_dir, tmp_path):
    actors_before, groups_before = _live_actors(), _reserved_groups()
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    trainer = TrainerConfig(model=tiny_model_dir)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 but TopologySpec.engine_tp=1"):
        Coordinator(
            spec, EngineConfig(model=tiny_model_dir, tensor_parallel_size=2), trainer, grpo_loss
        )
    with pytest.raises(ConfigError, match="is not a directory"):
        Coordinator(spec, EngineConfig(model=str(tmp_path / "nope")), trainer, grpo_loss)
    with pytest.raises(ConfigError, match="sleep_level=3"):
        Coordinator(spec, EngineConfig(model=tiny_model_dir), trainer, grpo_loss, sleep_level=3)
    level2 = Coordinator(
        spec, EngineConfig(model=tiny_model_dir), trainer, grpo_loss, sleep_level=2
    )
    with pytest.raises(PhaseError, match="generate needs phase 'rollout'.*'init'"):
        level2.generate(PROMPTS, SAMPLING)
    # Neither the refused configurations nor a valid one that was never started created an
    # actor or reserved a GPU.
    assert level2.phase is Phase.INIT and level2.fleet is None and level2.reservation is None
    assert _live_actors() - actors_before == set()
    assert _reserved_groups() - groups_before == set()


def test_plain_torch_trainer_fallback_runs_the_loop(ray_local, tiny_model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1)
    with Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir),
        TrainerConfig(model=tiny_model_dir, lr=1e-3, deepspeed=False),
        grpo_loss,
    ) as coord:
        before = coord.trainer_fingerprints()
        report = _cycle(coord)
        assert report.verified_tensors == len(coord.bucket_plan.metas)
        assert coord.trainer_fingerprints() != before  # the torch optimizer stepped
        names = {s.name for s in coord.timeline.spans}
    assert {"trainer.offload", "trainer.reload", "engine.sleep"} <= names
