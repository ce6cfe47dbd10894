"""An actor refusing its input in the middle of a chain, on the fake fleet (no vLLM/DeepSpeed).

A refusal before anything is sent leaves the pipeline where it was; one that comes back after
hand-overs ran cannot (the memory states are no longer the phase's): the pipeline is FAILED,
no step is counted, and ``recover()`` brings the loop back.
"""

from __future__ import annotations

import pytest
from fakes import RefusingTrainer, fake_coordinator, fake_model_dir

from colocate import (
    InputError,
    Phase,
    Sampling,
)

pytestmark = [pytest.mark.fast, pytest.mark.timeout(60)]

SAMPLING = Sampling(n=2, max_tokens=4)
PROMPTS = ["a", "b", "c", "d"]


def test_a_shard_refused_after_the_hand_over_leaves_failed_and_counts_no_step(ray_local, tmp_path):
    model = fake_model_dir(tmp_path / "fake-model")
    coord = fake_coordinator(model, trainer_cls=RefusingTrainer)
    with coord:
        rows = [0] * len(coord.generate(PROMPTS, SAMPLING))
        coord.train({"x": rows})
        coord.sync()
        step = coord.step
        rows = [0] * len(coord.generate(PROMPTS, SAMPLING))
        with pytest.raises(InputError, match="refused the shard"):
            coord.train({"x": rows, "refuse": rows})  # after the train row ran
        assert coord.step == step
        assert coord.phase is Phase.FAILED
        coord.recover()
        assert coord.phase is Phase.ROLLOUT
        rows = [0] * len(coord.generate(PROMPTS, SAMPLING))
        coord.train({"x": rows})
        coord.sync()
        assert coord.step == step + 1
        assert coord.timeline.ordering_violations() == []
