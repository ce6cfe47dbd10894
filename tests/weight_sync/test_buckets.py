"""Bucket layout, fingerprints, transfer groups, applied-weight checks: pure, no Ray."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from placement import TopologySpec, plan
from weight_sync import LLAMA_PACKING as LLAMA
from weight_sync import (
    Backend,
    Bucket,
    BucketPlan,
    BucketPlanError,
    Packing,
    TensorMeta,
    WeightSyncError,
    compare,
    fingerprint,
    plan_buckets,
    plan_transfer_groups,
)
from weight_sync.buckets import TensorSlot
from weight_sync.groups import Receiver
from weight_sync.verify import check_applied

pytestmark = pytest.mark.fast


def llama_metas(layers=2, hidden=128, inter=256, vocab=1024, dtype=torch.bfloat16):
    kv = hidden // 2
    metas = [TensorMeta("model.embed_tokens.weight", (vocab, hidden), dtype)]
    for i in range(layers):
        p = f"model.layers.{i}"
        metas += [
            TensorMeta(f"{p}.self_attn.q_proj.weight", (hidden, hidden), dtype),
            TensorMeta(f"{p}.self_attn.k_proj.weight", (kv, hidden), dtype),
            TensorMeta(f"{p}.self_attn.v_proj.weight", (kv, hidden), dtype),
            TensorMeta(f"{p}.self_attn.o_proj.weight", (hidden, hidden), dtype),
            TensorMeta(f"{p}.mlp.gate_proj.weight", (inter, hidden), dtype),
            TensorMeta(f"{p}.mlp.up_proj.weight", (inter, hidden), dtype),
            TensorMeta(f"{p}.mlp.down_proj.weight", (hidden, inter), dtype),
            TensorMeta(f"{p}.input_layernorm.weight", (hidden,), dtype),
            TensorMeta(f"{p}.post_attention_layernorm.weight", (hidden,), dtype),
        ]
    return metas + [
        TensorMeta("model.norm.weight", (hidden,), dtype),
        TensorMeta("lm_head.weight", (vocab, hidden), dtype),
    ]


def test_llama_packing_names_the_fused_parameter():
    assert LLAMA.engine_name("model.layers.3.self_attn.k_proj.weight") == (
        "model.layers.3.self_attn.qkv_proj.weight"
    )
    assert LLAMA.engine_name("model.layers.3.mlp.up_proj.weight") == (
        "model.layers.3.mlp.gate_up_proj.weight"
    )
    assert LLAMA.engine_name("model.up_projection.weight") == ("model.up_projection.weight")


# What weight_sync.packing reads from a vLLM Qwen3-MoE layer: one rule per expert and projection.
MOE = Packing(
    modules=((("q_proj", "k_proj", "v_proj"), "qkv_proj"),),
    prefixes=tuple(
        (f"model.layers.0.mlp.experts.{e}.{p}.", f"model.layers.0.mlp.experts.routed_experts.{w}_")
        for e in range(12)
        for p, w in (("gate_proj", "w13"), ("up_proj", "w13"), ("down_proj", "w2"))
    )
    + (
        (
            "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.experts.routed_experts.w13_weight",
        ),
    ),
    architecture="Qwen3MoeForCausalLM",
)


def test_moe_packing_maps_every_expert_to_its_fused_parameter():
    base = "model.layers.0.mlp.experts"
    assert MOE.engine_name(f"{base}.3.up_proj.weight") == f"{base}.routed_experts.w13_weight"
    # experts.1 is a prefix of experts.11 as a string, not at a dot: no mix-up
    assert MOE.engine_name(f"{base}.11.down_proj.weight") == f"{base}.routed_experts.w2_weight"
    # the whole 3-D tensor (transformers 5's layout) names the same parameter
    assert MOE.engine_name(f"{base}.gate_up_proj") == f"{base}.routed_experts.w13_weight"
    assert MOE.engine_name("model.layers.0.mlp.gate.weight") == "model.layers.0.mlp.gate.weight"
    assert MOE.engine_name("model.layers.0.self_attn.v_proj.weight") == (
        "model.layers.0.self_attn.qkv_proj.weight"
    )
    ckpt = [f"{base}.{e}.{p}.weight" for e in range(12) for p in ("gate_proj", "up_proj")]
    engine = [f"{base}.routed_experts.w13_weight", f"{base}.routed_experts.w2_weight"]
    assert MOE.uncovered(ckpt, engine) == [f"{base}.routed_experts.w2_weight"]
    metas = [TensorMeta(n, (8, 4), torch.bfloat16) for n in ckpt]
    plan_ = plan_buckets(metas, 256, MOE)  # the layer's 24 tensors stay in one bucket
    assert len(plan_.buckets) == 1 and plan_.max_bucket_bytes > 256


def test_packing_crosses_ray_intact():
    import pickle

    again = pickle.loads(pickle.dumps(MOE))
    assert again == MOE
    assert again.engine_name("model.layers.0.mlp.experts.2.gate_proj.weight").endswith("w13_weight")


@settings(max_examples=200, deadline=None)
@given(bucket=st.integers(min_value=1, max_value=400_000), layers=st.integers(1, 4))
def test_plan_keeps_groups_whole_and_covers_every_tensor(bucket, layers):
    metas = llama_metas(layers)
    p = plan_buckets(metas, bucket, LLAMA)
    assert sorted(m.name for m in p.metas) == sorted(m.name for m in metas)
    home = {}
    for b in p.buckets:
        for s in b.slots:
            home.setdefault(LLAMA.engine_name(s.meta.name), set()).add(b.index)
        # A bucket exceeds the request only when it holds a single oversized group.
        groups = {LLAMA.engine_name(s.meta.name) for s in b.slots}
        assert b.nbytes <= bucket or len(groups) == 1
    assert all(len(v) == 1 for v in home.values())
    assert p.total_bytes == sum(m.nbytes for m in metas)


def test_views_round_trip():
    metas = llama_metas(1, dtype=torch.float32)
    p = plan_buckets(metas, 200_000, LLAMA)
    tensors = {m.name: torch.randn(m.shape) for m in metas}
    for b in p.buckets:
        buf = torch.zeros(b.nbytes, dtype=torch.uint8)
        for name, view in b.views(buf):
            view.copy_(tensors[name])
        for name, view in b.views(buf.clone()):
            assert torch.equal(view, tensors[name])


def test_split_fused_group_is_rejected():
    q, k, v = llama_metas(1)[1:4]
    with pytest.raises(BucketPlanError, match="fused group .*qkv_proj.* is split"):
        BucketPlan(
            (
                Bucket(0, (TensorSlot(q, 0), TensorSlot(k, 32768)), 65536),
                Bucket(1, (TensorSlot(v, 0),), 16384),
            ),
            65536,
            LLAMA,
        )


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_bucket_size(bad):
    with pytest.raises(BucketPlanError, match="bucket_bytes"):
        plan_buckets(llama_metas(1), bad, LLAMA)


def test_overlapping_slots_are_rejected():
    q = llama_metas(1)[1]
    with pytest.raises(BucketPlanError, match="overlaps"):
        BucketPlan(
            (Bucket(0, (TensorSlot(q, 0), TensorSlot(llama_metas(1)[4], 64)), 99999),), 1, LLAMA
        )


def test_fingerprint_is_exact_additive_and_order_free():
    a, b = torch.randn(300, 64).bfloat16(), torch.randn(100, 64).bfloat16()
    whole = fingerprint(torch.cat([a, b]))
    assert whole == fingerprint(a) + fingerprint(b)
    assert fingerprint(a.t().contiguous()) == fingerprint(a)  # layout-free
    flipped = a.clone()
    flipped.view(torch.int16)[7, 3] ^= 1  # one mantissa bit
    assert fingerprint(flipped) != fingerprint(a)
    big = torch.randn(5_000_000)
    assert fingerprint(big) == fingerprint(big.clone())


def test_compare_names_first_mismatch():
    a = {"x": fingerprint(torch.ones(3)), "y": fingerprint(torch.zeros(3))}
    compare(a, dict(a), where="w")
    with pytest.raises(WeightSyncError, match="tensor 'y' arrived corrupted"):
        compare(a, {"x": a["x"], "y": fingerprint(torch.ones(3))}, where="engine0")
    with pytest.raises(WeightSyncError, match="'x' was sent but not received"):
        compare(a, {"y": a["y"]}, where="engine0")


def test_check_applied_sums_fused_members_and_tp_shards():
    q, k, v = torch.randn(8, 4), torch.randn(4, 4), torch.randn(4, 4)
    norm = torch.randn(4)
    sent = {
        "l.self_attn.q_proj.weight": fingerprint(q),
        "l.self_attn.k_proj.weight": fingerprint(k),
        "l.self_attn.v_proj.weight": fingerprint(v),
        "l.norm.weight": fingerprint(norm),
    }
    fused = torch.cat([q, k, v])
    shard0, shard1 = fused[:8], fused[8:]
    workers = [
        {"l.self_attn.qkv_proj.weight": fingerprint(shard0), "l.norm.weight": fingerprint(norm)},
        {"l.self_attn.qkv_proj.weight": fingerprint(shard1), "l.norm.weight": fingerprint(norm)},
    ]
    assert check_applied(sent, workers, LLAMA, where="e0") == 2
    workers[1]["l.self_attn.qkv_proj.weight"] = fingerprint(shard1 * 2)
    with pytest.raises(WeightSyncError, match="qkv_proj"):
        check_applied(sent, workers, LLAMA, where="e0")


def test_transfer_groups_by_placement():
    colocated = plan(
        TopologySpec(nodes=1, gpus_per_node=4, trainer_world_size=4, engines=2, engine_tp=2)
    )
    (cpu,) = plan_transfer_groups(colocated, "cpu")
    assert cpu.backend is Backend.GLOO and cpu.sender_rank == 0 and cpu.world_size == 5
    cuda = plan_transfer_groups(colocated, "cuda")
    assert [(g.sender_rank, g.backend) for g in cuda] == [(r, Backend.CUDA_IPC) for r in range(4)]
    assert cuda[3].receivers == (Receiver(1, 1),)
    separate = plan(
        TopologySpec(nodes=1, gpus_per_node=4, trainer_world_size=2, engines=2, colocate=False)
    )
    (nccl,) = plan_transfer_groups(separate, "cuda")
    assert nccl.backend is Backend.NCCL and nccl.rank_of(Receiver(1, 0)) == 2
