"""One-step off-policy pipelining (trainer and engines on separate GPUs), on the fake fleet:
the staleness bound holds (read from the versions stamped on completions), the weights of step
k reach the engines before batch k+2, faults in either pool give typed errors and recover()
works, and asking for it on a colocated topology is refused before anything starts."""

from __future__ import annotations

import pytest
from fakes import fake_coordinator, fake_model_dir

from colocate import (
    ActorFailedError,
    ConfigError,
    Fault,
    Phase,
    PhaseError,
    Pipeline,
    PipelineConfig,
    Sampling,
    StalenessError,
)
from placement import TopologySpec

pytestmark = [pytest.mark.fast, pytest.mark.timeout(120)]

SEPARATE = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=1, engines=1, colocate=False)
SAMPLING = Sampling(n=2, max_tokens=4)
PROMPTS = ["a", "b", "c", "d"]
ASYNC = PipelineConfig(mode=Pipeline.ASYNC, max_staleness=1)


def _coordinator(model_dir, spec=SEPARATE, pipeline=ASYNC):
    return fake_coordinator(model_dir, spec, pipeline=pipeline)


def _batch(completions) -> dict:
    return {"x": [0] * len(completions), "weight_version": [c.weight_version for c in completions]}


@pytest.fixture
def model_dir(tmp_path):
    return fake_model_dir(tmp_path / "fake-model")


def test_async_on_a_colocated_topology_is_refused_before_anything_starts(model_dir):
    colocated = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    with pytest.raises(ConfigError, match="mode='async'.*colocate=True.*fix: TopologySpec"):
        _coordinator(model_dir, spec=colocated)
    with pytest.raises(ConfigError, match="max_staleness=0"):
        PipelineConfig(mode=Pipeline.ASYNC, max_staleness=0)


def test_staleness_is_bounded_and_weights_of_step_k_reach_batch_k_plus_2(ray_local, model_dir):
    steps, versions, staleness = 6, [], []
    with _coordinator(model_dir) as coord:
        pending = coord.generate_async(PROMPTS, SAMPLING)
        for step in range(steps):
            completions = pending.result()
            versions.append({c.weight_version for c in completions})
            if step + 1 < steps:  # batch k+1 starts on the weights the engines hold now
                pending = coord.generate_async(PROMPTS, SAMPLING)
            staleness.append(coord.train(_batch(completions))["staleness"])
            coord.sync()
        assert coord.weight_version == steps + 1
        assert coord.timeline.ordering_violations() == []
    # Batch 0 and 1 were generated with the first weights; batch k >= 1 with the weights
    # after step k - 1 (version k): the weights of step k reached batch k + 2.
    assert versions == [{max(1, k)} for k in range(steps)]
    assert staleness == [0.0] + [1.0] * (steps - 1)
    assert max(staleness) <= ASYNC.max_staleness


def test_a_batch_older_than_the_bound_is_refused_before_anything_runs(ray_local, model_dir):
    with _coordinator(model_dir) as coord:
        old = coord.generate_async(PROMPTS, SAMPLING).result()
        coord.train(_batch(old))
        coord.train(_batch(old))  # staleness 1: allowed
        steps = coord.step
        with pytest.raises(StalenessError, match=r"2 optimizer steps behind.*max_staleness=1"):
            coord.train(_batch(old))
        assert coord.step == steps and coord.phase is Phase.TRAIN  # nothing ran
        coord.sync()


def test_generate_async_needs_the_async_pipeline(ray_local, model_dir):
    with _coordinator(model_dir, pipeline=None) as coord:
        with pytest.raises(PhaseError, match="generate_async needs PipelineConfig"):
            coord.generate_async(PROMPTS, SAMPLING)


def test_faults_in_either_pool_while_running_async(ray_local, model_dir, tmp_path):
    with _coordinator(model_dir) as coord:
        ckpt = coord.save_trainer(str(tmp_path / "ckpt"))
        coord.inject_fault("engine0", Fault.CRASH_IN_GENERATE)
        pending = coord.generate_async(PROMPTS, SAMPLING)
        with pytest.raises(ActorFailedError) as err:
            pending.result()
        assert (err.value.actor, err.value.phase) == ("engine0", "rollout")
        assert coord.phase is Phase.FAILED
        coord.recover()
        completions = coord.generate_async(PROMPTS, SAMPLING).result()
        pending = coord.generate_async(PROMPTS, SAMPLING)  # in flight while the trainer dies
        coord.inject_fault("trainer0", Fault.CRASH_IN_TRAIN_STEP)
        with pytest.raises(ActorFailedError) as err:
            coord.train(_batch(completions))
        assert (err.value.actor, err.value.phase) == ("trainer0", "train")
        pending.result()  # the engine pool was not affected
        coord.recover(checkpoint=ckpt)
        assert coord.phase is Phase.ROLLOUT
        completions = coord.generate_async(PROMPTS, SAMPLING).result()
        coord.train(_batch(completions))
        coord.sync()
