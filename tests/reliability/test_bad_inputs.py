"""The bad-input catalog: every entry must raise the stated type with the stated key words.

``CATALOG`` (pure: no Ray) and ``PIPELINE_CATALOG`` (against a running pipeline) are also read
by scripts/reliability_report.py to write the table in docs/reliability.md.
"""

import json
import math

import pytest
import torch

from colocate import (
    ConfigError,
    Coordinator,
    EngineConfig,
    Phase,
    PhaseError,
    PromptTooLongError,
    Sampling,
    SyncConfig,
    TrainerConfig,
    grpo_loss,
    make_grpo_batch,
)
from colocate.actors.trainer import shard_batch
from colocate.algorithms.micro_batches import plan_step
from colocate.core.config import check_engine_model
from colocate.core.run_config import Timeouts
from colocate.core.syncing import check_compatible
from placement import TopologyError, TopologySpec, plan
from placement.spec import ClusterInfo, NodeInfo
from weight_sync import (
    LLAMA_PACKING,
    Backend,
    BucketPlanError,
    EngineWeights,
    PackingError,
    Rendezvous,
    TensorMeta,
    plan_buckets,
)
from weight_sync.buckets import Bucket, BucketPlan, TensorSlot

pytestmark = pytest.mark.timeout(600)

SPEC = dict(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
BF16 = torch.bfloat16


def _meta(name, shape=(4, 4)):
    return TensorMeta(name, shape, BF16)


def _split_qkv():
    q, k, v = (_meta(f"l.self_attn.{p}_proj.weight") for p in "qkv")
    return BucketPlan(
        (Bucket(0, (TensorSlot(q, 0), TensorSlot(k, 64)), 128), Bucket(1, (TensorSlot(v, 0),), 64)),
        128,
        LLAMA_PACKING,
    )


def _engine(*metas, params=None):
    names = tuple(m.name for m in metas) if params is None else params
    return EngineWeights(tuple(metas), LLAMA_PACKING, names)


def _model_dir(tmp, **config):
    tmp.mkdir(parents=True, exist_ok=True)
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp / "config.json").write_text(json.dumps({**base, **config}))
    return str(tmp)


# (id, function of a tmp dir and the tiny model dir, exception type, key words in the message)
CATALOG = [
    (
        "topology: zero nodes",
        lambda t, m: TopologySpec(**{**SPEC, "nodes": 0}),
        TopologyError,
        ["nodes=0", "integer >= 1"],
    ),
    (
        "topology: TP not dividing GPUs per node",
        lambda t, m: TopologySpec(
            nodes=1, gpus_per_node=4, trainer_world_size=4, engines=1, engine_tp=3
        ),
        TopologyError,
        ["engine_tp=3", "divisor of 4"],
    ),
    (
        "topology: TP larger than GPUs per node",
        lambda t, m: TopologySpec(**{**SPEC, "engines": 1, "engine_tp": 4}),
        TopologyError,
        ["engine_tp=4", "engine_tp <= 2"],
    ),
    (
        "topology: GPU fractions summing over 1",
        lambda t, m: TopologySpec(**SPEC, trainer_gpu_fraction=0.6, engine_gpu_fraction=0.5),
        TopologyError,
        ["1.1 > 1", "sum to at most 1"],
    ),
    (
        "topology: trainer ranks not matching colocated GPUs",
        lambda t, m: TopologySpec(**{**SPEC, "trainer_world_size": 3}),
        TopologyError,
        ["trainer_world_size=3", "set trainer_world_size=2"],
    ),
    (
        "topology: NaN GPU fraction",
        lambda t, m: TopologySpec(**SPEC, engine_gpu_fraction=math.nan),
        TopologyError,
        ["engine_gpu_fraction=nan", "not finite"],
    ),
    (
        "topology: more nodes than the cluster has",
        lambda t, m: plan(
            TopologySpec(nodes=2, gpus_per_node=2, trainer_world_size=4, engines=4),
            ClusterInfo((NodeInfo("n", "10.0.0.1", 2, 4),)),
        ),
        TopologyError,
        ["nodes=2", "only 1 node(s)"],
    ),
    (
        "engine: gpu_memory_utilization above 1",
        lambda t, m: EngineConfig(model=m, gpu_memory_utilization=1.5),
        ConfigError,
        ["gpu_memory_utilization=1.5", "(0, 1]"],
    ),
    (
        "engine: gpu_memory_utilization zero",
        lambda t, m: EngineConfig(model=m, gpu_memory_utilization=0),
        ConfigError,
        ["gpu_memory_utilization=0", "(0, 1]"],
    ),
    (
        "engine: gpu_memory_utilization NaN",
        lambda t, m: EngineConfig(model=m, gpu_memory_utilization=math.nan),
        ConfigError,
        ["gpu_memory_utilization=nan"],
    ),
    (
        "engine: TP not dividing the heads",
        lambda t, m: check_engine_model(
            EngineConfig(model=_model_dir(t), tensor_parallel_size=3), "cpu"
        ),
        ConfigError,
        ["tensor_parallel_size=3", "num_attention_heads=4"],
    ),
    (
        "engine: missing model directory",
        lambda t, m: check_engine_model(EngineConfig(model=str(t / "nope")), "cpu"),
        ConfigError,
        ["is not a directory", "nothing is downloaded"],
    ),
    (
        "engine: head size the CPU backend refuses",
        lambda t, m: check_engine_model(EngineConfig(model=_model_dir(t)), "cpu"),
        ConfigError,
        ["head_dim=16", "vLLM CPU backend refuses"],
    ),
    (
        "engine: directory without weights",
        lambda t, m: check_engine_model(EngineConfig(model=_model_dir(t, hidden_size=128)), "cpu"),
        ConfigError,
        ["holds no weights", "DUMMY"],
    ),
    (
        "engine: unknown load format",
        lambda t, m: EngineConfig(model=m, load_format="bogus"),
        ConfigError,
        ["load_format='bogus'", "'auto', 'dummy'"],
    ),
    (
        "engine: vllm_kwargs overriding owned fields",
        lambda t, m: EngineConfig(model=m, vllm_kwargs={"seed": 3}),
        ConfigError,
        ["vllm_kwargs", "use the EngineConfig fields"],
    ),
    (
        "sync: bucket size zero",
        lambda t, m: SyncConfig(bucket_bytes=0),
        ConfigError,
        ["bucket_bytes=0", "int > 0"],
    ),
    (
        "sync: negative bucket size",
        lambda t, m: SyncConfig(bucket_bytes=-1),
        ConfigError,
        ["bucket_bytes=-1"],
    ),
    (
        "buckets: planner given size 0",
        lambda t, m: plan_buckets([_meta("a")], 0, LLAMA_PACKING),
        BucketPlanError,
        ["bucket_bytes=0"],
    ),
    (
        "buckets: a plan splitting q/k/v",
        lambda t, m: _split_qkv(),
        BucketPlanError,
        ["qkv_proj", "is split", "corrupt the layer"],
    ),
    (
        "sync: trainer tensor unknown to the engine",
        lambda t, m: check_compatible([_meta("extra.weight")], _engine()),
        ConfigError,
        ["'extra.weight'", "does not exist in the engine's model"],
    ),
    (
        "sync: shapes differ",
        lambda t, m: check_compatible([_meta("w", (4, 4))], _engine(_meta("w", (8, 4)))),
        ConfigError,
        ["'w'", "(4, 4)", "(8, 4)"],
    ),
    (
        "sync: engine tensor the trainer lacks",
        lambda t, m: check_compatible([], _engine(_meta("lm_head.weight"))),
        ConfigError,
        ["'lm_head.weight'", "never be updated"],
    ),
    (
        "sync: engine parameter the packing does not explain",
        lambda t, m: check_compatible(
            [_meta("l.mlp.w1.weight")],
            _engine(_meta("l.mlp.w1.weight"), params=("l.mlp.fused_w.weight",)),
        ),
        PackingError,
        ["LlamaForCausalLM", "'l.mlp.fused_w.weight'", "packing", "fix:"],
    ),
    ("sampling: n = 0", lambda t, m: Sampling(n=0), ConfigError, ["Sampling.n=0"]),
    (
        "sampling: negative temperature",
        lambda t, m: Sampling(temperature=-1.0),
        ConfigError,
        ["temperature=-1.0"],
    ),
    (
        "trainer: ZeRO stage 4",
        lambda t, m: TrainerConfig(model=m, zero_stage=4),
        ConfigError,
        ["zero_stage=4", "0, 1, 2 or 3"],
    ),
    (
        "trainer: learning rate 0",
        lambda t, m: TrainerConfig(model=m, lr=0.0),
        ConfigError,
        ["TrainerConfig.lr=0.0"],
    ),
    (
        "trainer: micro-batch of 0 rows",
        lambda t, m: TrainerConfig(model=m, micro_batch_size=0),
        ConfigError,
        ["TrainerConfig.micro_batch_size=0", "fix:"],
    ),
    (
        "trainer: no optimizer step per epoch",
        lambda t, m: TrainerConfig(model=m, mini_batches=0),
        ConfigError,
        ["TrainerConfig.mini_batches=0"],
    ),
    (
        "trainer: shard too small for its optimizer steps",
        lambda t, m: plan_step(2, 2, 3, None),
        ValueError,
        ["2 rows cannot make 3 optimizer steps", "fix:"],
    ),
    (
        "trainer: epochs 0",
        lambda t, m: TrainerConfig(model=m, epochs=0),
        ConfigError,
        ["TrainerConfig.epochs=0"],
    ),
    ("coordinator: zero step timeout", lambda t, m: Timeouts(step_s=0), ConfigError, ["step_s=0"]),
    (
        "transport: port 0",
        lambda t, m: Rendezvous("127.0.0.1", 0, 2, "k", 5.0, Backend.GLOO),
        ValueError,
        ["port=0"],
    ),
    (
        "coordinator: sleep level 3",
        lambda t, m: Coordinator(
            TopologySpec(**SPEC),
            EngineConfig(model=m),
            TrainerConfig(model=m),
            grpo_loss,
            sleep_level=3,
        ),
        ConfigError,
        ["sleep_level=3"],
    ),
    (
        "coordinator: engine TP differs from topology",
        lambda t, m: Coordinator(
            TopologySpec(**SPEC),
            EngineConfig(model=m, tensor_parallel_size=2),
            TrainerConfig(model=m),
            grpo_loss,
        ),
        ConfigError,
        ["tensor_parallel_size=2", "engine_tp=1"],
    ),
    (
        "coordinator: loss is not callable",
        lambda t, m: Coordinator(
            TopologySpec(**SPEC), EngineConfig(model=m), TrainerConfig(model=m), None
        ),
        ConfigError,
        ["loss_fn=None", "callable"],
    ),
    (
        "coordinator: plain-torch trainer with 2 ranks",
        lambda t, m: Coordinator(
            TopologySpec(**SPEC),
            EngineConfig(model=m),
            TrainerConfig(model=m, deepspeed=False),
            grpo_loss,
        ),
        ConfigError,
        ["deepspeed=False", "trainer_world_size=1"],
    ),
    (
        "coordinator: token budget below max_model_len",
        lambda t, m: Coordinator(
            TopologySpec(**SPEC),
            EngineConfig(model=m, max_model_len=512),
            TrainerConfig(model=m, max_tokens_per_micro_batch=256),
            grpo_loss,
        ),
        ConfigError,
        ["TrainerConfig.max_tokens_per_micro_batch=256", "max_model_len=512", ">= 512"],
    ),
    (
        "trainer: batch with fewer rows than ranks",
        lambda t, m: shard_batch({"x": torch.zeros(1, 3)}, 0, 2),
        ValueError,
        ["1 rows for 2 trainer ranks"],
    ),
    (
        "losses: rewards not matching completions",
        lambda t, m: make_grpo_batch([], [1.0], 4, 0),
        ValueError,
        ["do not form groups of 4"],
    ),
    (
        "coordinator: calls after shutdown",
        lambda t, m: _after_shutdown(m),
        PhaseError,
        ["generate needs phase 'rollout'", "'shutdown'"],
    ),
]


def _after_shutdown(model):
    coord = Coordinator(
        TopologySpec(**SPEC), EngineConfig(model=model), TrainerConfig(model=model), grpo_loss
    )
    coord.shutdown()
    coord.generate(["x"], Sampling())


@pytest.mark.fast
@pytest.mark.parametrize("case", CATALOG, ids=[c[0] for c in CATALOG])
def test_bad_input_is_refused_clearly(case, tmp_path, tiny_model_dir, report):
    name, fn, exc_type, words = case
    with pytest.raises(exc_type) as err:
        fn(tmp_path, tiny_model_dir)
    message = str(err.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    report.setdefault("bad_inputs", []).append(
        {"input": name, "error": type(err.value).__name__, "message": message[:160]}
    )


# Against the running pipeline: (id, function of the coordinator, type, key words).
PIPELINE_CATALOG = [
    (
        "generate: prompt longer than max_model_len",
        lambda c: c.generate(["kato " * 600], Sampling(max_tokens=8)),
        PromptTooLongError,
        ["max_model_len=512", "shorten the prompt"],
    ),
    (
        "generate: empty prompt list",
        lambda c: c.generate([], Sampling()),
        ValueError,
        ["prompts is empty"],
    ),
    (
        "phase: recover while healthy",
        lambda c: c.recover(),
        PhaseError,
        ["recover needs phase 'failed'", "'rollout'"],
    ),
    ("phase: start twice", lambda c: c.start(), PhaseError, ["start() called twice"]),
]


@pytest.mark.parametrize("case", PIPELINE_CATALOG, ids=[c[0] for c in PIPELINE_CATALOG])
def test_bad_input_against_a_running_pipeline(case, pipeline, report):
    name, fn, exc_type, words = case
    assert pipeline.phase is Phase.ROLLOUT
    with pytest.raises(exc_type) as err:
        fn(pipeline)
    for w in words:
        assert w in str(err.value), str(err.value)
    assert pipeline.phase is Phase.ROLLOUT  # refused input changes nothing
    report.setdefault("bad_inputs", []).append(
        {"input": name, "error": type(err.value).__name__, "message": str(err.value)[:160]}
    )


def test_generate_in_train_phase_is_refused(pipeline):
    completions = pipeline.generate(["kato rimu", "sena lo"], Sampling(n=2, max_tokens=4))
    pipeline.train(make_grpo_batch(completions, [0.0, 1.0, 1.0, 0.0], 2, pad_id=2))
    with pytest.raises(PhaseError, match="generate needs phase 'rollout'.*'train'"):
        pipeline.generate(["kato"], Sampling())
    assert pipeline.phase is Phase.TRAIN
    pipeline.sync()


def test_trainer_and_engine_models_that_differ_are_refused_before_sending(
    ray_local, tiny_model_dir, tmp_path
):
    from colocate import TinyModelSpec, build_tiny_model

    other = str(build_tiny_model(TinyModelSpec(intermediate_size=384), cache_root=tmp_path))
    spec = TopologySpec(nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1)
    coord = Coordinator(
        spec,
        EngineConfig(model=tiny_model_dir),
        TrainerConfig(model=other, zero_stage=1),
        grpo_loss,
    )
    try:
        with pytest.raises(ConfigError, match=r"mlp\.\w+_proj\.weight. has shape .*384"):
            coord.start()
        assert coord.phase is Phase.FAILED
    finally:
        coord.shutdown()
