"""ZeRO-3 start-up loads each rank's partitions only (real DeepSpeed, two Ray actors, gloo)."""

import pytest
import ray
from safetensors.torch import load_file

from colocate import TrainerConfig, lm_loss
from colocate.actors.trainer import TrainerActor
from colocate.core.contract import Seat
from weight_sync.fingerprint import fingerprint

pytestmark = pytest.mark.timeout(600)


def _start(model_dir, cls=TrainerActor, world=2):
    actor = ray.remote(cls).options(num_gpus=0.5, num_cpus=0.1)
    env = {"DS_ACCELERATOR": "cpu"}
    config = TrainerConfig(model=model_dir)
    actors = [actor.remote(Seat("t", r, world, (r,), config, env, lm_loss)) for r in range(world)]
    master = ray.get(actors[0].host_group_store.remote(False, 60), timeout=60)
    return actors, ray.get([a.start.remote(master, 120) for a in actors], timeout=400)


def _stop(actors):
    ray.get([a.shutdown.remote() for a in actors], timeout=60)
    for a in actors:
        ray.kill(a)


def test_partitioned_start_holds_exactly_the_checkpoint(ray_local, tiny_model_dir):
    want = {
        n: fingerprint(t.float())
        for n, t in load_file(f"{tiny_model_dir}/model.safetensors").items()
    }
    actors, info = _start(tiny_model_dir)
    try:
        assert [i["start_mode"] for i in info] == ["partitioned", "partitioned"]
        got = ray.get([a.param_fingerprints.remote() for a in actors], timeout=120)
    finally:
        _stop(actors)
    assert got[0] == got[1] == want  # every full parameter, gathered from both partitions


def test_a_load_model_override_is_honoured(ray_local, tiny_model_dir):
    class GivenModel(TrainerActor):  # local: shipped to the worker by value
        def load_model(self):
            from colocate.actors.trainer_backend import load_model

            return load_model(self.config)

    actors, info = _start(tiny_model_dir, GivenModel, world=1)
    _stop(actors)
    assert info[0]["start_mode"] == "given by the trainer's load_model"
