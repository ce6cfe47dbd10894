"""How metrics combine over micro-batches, optimizer steps and ranks (pure, no Ray)."""

from __future__ import annotations

import pytest
import torch

from colocate.actors.trainer_backend import accumulate
from colocate.algorithms.metrics import merge_metrics

pytestmark = pytest.mark.fast


def test_max_metrics_take_the_maximum_and_others_the_weighted_mean():
    rows = [{"ratio_max": 1.5, "loss": 2.0}, {"ratio_max": 3.0, "loss": 4.0}]
    out = merge_metrics(rows, [0.75, 0.25])
    assert out == {"ratio_max": 3.0, "loss": 0.75 * 2.0 + 0.25 * 4.0}
    assert merge_metrics(rows) == {"ratio_max": 3.0, "loss": 3.0}


def test_a_filler_micro_batch_neither_raises_a_maximum_nor_moves_a_mean():
    rows = [{"ratio_max": 1.2, "x": 1.0}, {"ratio_max": 9.0, "x": 5.0}]
    assert merge_metrics(rows, [1.0, 0.0]) == {"ratio_max": 1.2, "x": 1.0}


def test_a_key_missing_from_a_row_is_absent_there_not_zero():
    out = merge_metrics([{"kl": 0.4}, {}], [0.5, 0.5])
    assert out == {"kl": 0.4}
    assert merge_metrics([]) == {}
    with pytest.raises(ValueError, match="2 rows but 1 weights"):
        merge_metrics([{}, {}], [1.0])


def test_accumulate_reports_the_largest_ratio_over_its_micro_batches():
    model = torch.nn.Linear(2, 1)

    def loss_fn(model, batch):
        loss = model(batch["x"]).sum()
        return loss, {"ratio_max": float(batch["r"]), "clip_fraction": float(batch["r"])}

    micro = [({"x": torch.ones(1, 2), "r": 1.1}, 0.5), ({"x": torch.ones(1, 2), "r": 4.0}, 0.5)]
    _, metrics = accumulate(loss_fn, model, micro, lambda: None, torch.Tensor.backward)
    assert metrics["ratio_max"] == 4.0  # a mean of maxima would say 2.55
    assert metrics["clip_fraction"] == pytest.approx(2.55)
