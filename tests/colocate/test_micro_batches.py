"""Micro-batches, mini-batches and activation checkpointing: the planner (pure) and the real
DeepSpeed ZeRO-3 step over two ranks (Ray actors, gloo)."""

import pytest
import ray
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from colocate import TrainerConfig, lm_loss
from colocate.actors.trainer import TrainerActor, shard_batch
from colocate.algorithms.batches import shard_for_ranks
from colocate.algorithms.micro_batches import plan_step, token_weights
from colocate.core.contract import Seat


@pytest.mark.fast
@settings(deadline=None)  # a busy 2-core machine: timing is not what this asserts
@given(
    rows=st.integers(1, 40),
    minis=st.integers(1, 4),
    mbs=st.one_of(st.none(), st.integers(1, 9)),
    extra=st.integers(0, 1),
)
def test_plan_covers_every_row_once_with_equal_counts_on_every_rank(rows, minis, mbs, extra):
    max_rows = rows + extra
    if max_rows < minis:
        with pytest.raises(ValueError, match="optimizer steps"):
            plan_step(rows, max_rows, minis, mbs)
        return
    mine, biggest = plan_step(rows, max_rows, minis, mbs), plan_step(max_rows, max_rows, minis, mbs)
    assert len(mine) == minis
    # Same micro-batch count per optimizer step on both ranks: their collectives pair up.
    assert [len(s) for s in mine] == [len(s) for s in biggest]
    covered = [r for step in mine for mb in step for r in range(mb.start, mb.stop)]
    assert covered == list(range(rows))
    if mbs is not None:
        assert all(mb.stop - mb.start <= mbs for step in mine for mb in step)


@pytest.mark.fast
def test_fillers_only_where_a_rank_has_fewer_rows_than_micro_batches():
    (step,) = plan_step(3, 4, 1, 1)
    assert [mb.empty for mb in step].count(True) == 1 and len(step) == 4
    assert not any(mb.empty for mb in plan_step(4, 4, 1, 1)[0])


@pytest.mark.fast
def test_token_weights():
    assert token_weights([3.0, 1.0, 0.0]) == [0.75, 0.25, 0.0]
    assert token_weights([0.0, 0.0]) == [0.0, 0.0]


def _batch(rows=7, width=20):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (rows, width), generator=g)
    mask = torch.zeros(rows, width)
    attention = torch.zeros_like(ids)
    for i in range(rows):  # uneven completion lengths: token weights differ from row weights
        mask[i, 4 : 5 + (3 * i + 1) % (width - 5)] = 1.0
        attention[i, : 5 + (3 * i + 1) % (width - 5)] = 1  # right-padded after its completion
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": mask}


def _load_export(path) -> dict:
    """Every tensor of a (sharded) export, by name."""
    out = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _step_and_export(model_dir, out, chunk_bytes=64 << 10, **kw):
    """Two ZeRO-3 ranks take one train call on ``_batch`` and export their fp32 weights.

    The export streams 64 KiB chunks by default (many shards, one gathered chunk at a time);
    the full-batch run exports in one chunk, so the comparison also covers the streaming.
    """
    # eps=1 makes the first AdamW update ~ lr * grad (with the default eps it is ~ lr *
    # sign(grad), blind to how the gradient was scaled); lr=1 makes that visible.
    fields = {
        "lr": 1.0,
        "grad_clip": 0.0,
        "ds_config": {"optimizer": {"params": {"eps": 1.0}}},
        **kw,
    }
    config = TrainerConfig(model=model_dir, **fields)
    cls = ray.remote(TrainerActor).options(num_gpus=0.5, num_cpus=0.1)
    env = {"DS_ACCELERATOR": "cpu"}
    actors = [cls.remote(Seat("trainer", r, 2, (r,), config, env, lm_loss)) for r in range(2)]
    try:
        master = ray.get(actors[0].host_group_store.remote(False, 60), timeout=60)
        ray.get([a.start.remote(master, 60) for a in actors], timeout=400)
        batch = _batch()
        shards = [shard_batch(batch, r, 2) for r in range(2)]  # 4 and 3 rows
        if config.max_tokens_per_micro_batch:  # as the coordinator shards: by tokens
            shards, _ = shard_for_ranks(batch, 2, 1, None, config.max_tokens_per_micro_batch)
        metrics = ray.get(
            [a.train_step.remote(s, 4) for a, s in zip(actors, shards, strict=True)], timeout=300
        )
        ray.get([a.export_hf.remote(str(out), "float32", chunk_bytes) for a in actors], timeout=300)
    finally:
        ray.get([a.shutdown.remote() for a in actors], timeout=60)
        for a in actors:
            ray.kill(a)
    return _load_export(out), metrics


@pytest.mark.timeout(900)
def test_accumulated_step_equals_the_full_batch_step(ray_local, tiny_model_dir, tmp_path):
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    full, full_metrics = _step_and_export(tiny_model_dir, tmp_path / "full", chunk_bytes=1 << 30)
    assert len(list((tmp_path / "full").glob("model-*.safetensors"))) == 1
    assert len(list((tmp_path / "micro").glob("model-*.safetensors"))) == 0  # not yet written
    # 4 micro-batches of one row on rank 0; rank 1 has 3 rows, so one zero-weight filler
    micro, micro_metrics = _step_and_export(tiny_model_dir, tmp_path / "micro", micro_batch_size=1)
    ckpt, _ = _step_and_export(
        tiny_model_dir, tmp_path / "ckpt", micro_batch_size=2, activation_checkpointing=True
    )
    # Packed sequences, at most 24 tokens per micro-batch (rows of 5 to 19 tokens), sharded by
    # tokens rather than rows: the step is still the full batch's.
    packed, packed_metrics = _step_and_export(
        tiny_model_dir, tmp_path / "packed", max_tokens_per_micro_batch=24
    )
    assert max(m["micro_batches"] for m in packed_metrics) > 1
    moved = max((full[k] - start[k].float()).abs().max().item() for k in full)
    assert moved > 1e-3  # the step is large enough for a wrong weighting to show
    for name in full:
        assert torch.allclose(micro[name], full[name], rtol=0, atol=1e-5), name
        assert torch.allclose(ckpt[name], full[name], rtol=0, atol=1e-5), name
        assert torch.allclose(packed[name], full[name], rtol=0, atol=1e-5), name
    mean = lambda ms: sum(m["loss"] for m in ms) / len(ms)  # noqa: E731  over the ranks
    for ms in (micro_metrics, packed_metrics):
        assert abs(mean(ms) - mean(full_metrics)) < 1e-5  # the token-weighted loss is the full one


@pytest.mark.timeout(600)
def test_mini_batches_and_epochs_take_that_many_optimizer_steps(
    ray_local, tiny_model_dir, tmp_path
):
    plain = {"lr": 1e-3, "ds_config": {}}
    _, ppo = _step_and_export(
        tiny_model_dir, tmp_path / "ppo", mini_batches=2, epochs=2, micro_batch_size=1, **plain
    )
    assert [m["optimizer_steps"] for m in ppo] == [4.0, 4.0]
    # Three epochs over the same rows: the later steps see an improved policy.
    _, again = _step_and_export(tiny_model_dir, tmp_path / "epochs", epochs=3, **plain)
    for m in again:
        assert m["optimizer_steps"] == 3.0 and m["loss"] < m["first_loss"]
