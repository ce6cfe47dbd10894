"""``python -m colocate.operations.memory_plan_cli``: print (and optionally check) a memory plan."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from colocate.operations.memory_plan import (
    GIB,
    BundleMemory,
    MemoryPlanError,
    MemorySettings,
    Pool,
    RoleLoad,
    check_plan,
    model_shape,
    plan_memory,
)

__all__ = ["main"]

_DTYPE = {"bf16": 2, "fp16": 2, "fp32": 4}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m colocate.operations.memory_plan_cli",
        description="The bytes each GPU holds in each phase of a colocated RL run, itemised.",
    )
    p.add_argument("--model", required=True, help="local HF model directory (config.json)")
    p.add_argument("--gpus", type=int, default=2, help="trainer ranks (colocated: GPUs)")
    p.add_argument("--tp", type=int, default=1, help="engine tensor-parallel size")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--train-dtype", default="bf16", choices=sorted(_DTYPE))
    p.add_argument("--engine-dtype", default="bf16", choices=sorted(_DTYPE))
    p.add_argument("--sleep-level", type=int, default=1, choices=[1, 2])
    p.add_argument("--kv-cache-gib", type=float, help="KV-cache size (else from utilization)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument(
        "--max-tokens-per-micro-batch",
        type=int,
        help="token budget: each micro-batch is one packed row of this many tokens, in place "
        "of --micro-batch rows of --seq-len (with --ppo, every role's too)",
    )
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--bucket-mib", type=int, default=512, help="sync bucket size")
    p.add_argument("--device-gib", type=float, help="check against GPUs of this size")
    p.add_argument("--cpu", action="store_true", help="plan a CPU run (host memory)")
    p.add_argument("--pool", default="shared", choices=[x.value for x in Pool])
    p.add_argument(
        "--ppo",
        action="store_true",
        help="add the PPO roles of examples/ppo_colocated.py on every trainer GPU: the "
        "reference and a reward model (frozen, fp32, the --model's shape, 16 rows per "
        "forward, resident in score) and the critic (its own ZeRO optimizer at --zero-stage "
        "and --train-dtype, --micro-batch or --max-tokens-per-micro-batch, resident in score "
        "and train)",
    )
    p.add_argument("--json", help="also write the plan here")
    return p


def _ppo_roles(args: argparse.Namespace) -> list[RoleLoad]:
    """The roles of ``examples/ppo_colocated.py``, one rank on each trainer GPU."""
    from colocate.core.config import DType, TrainerConfig
    from colocate.operations.memory_check import role_loads
    from colocate.roles.critic import CriticConfig, critic_role
    from colocate.roles.reference import reference_role
    from colocate.roles.reward_model import reward_model_role
    from placement import TopologySpec, plan

    dtype = {"bf16": DType.BFLOAT16, "fp16": DType.FLOAT16, "fp32": DType.FLOAT32}
    critic = TrainerConfig(
        model=args.model,
        zero_stage=args.zero_stage,
        dtype=dtype[args.train_dtype],
        # one of the two: padded rows, or a token budget
        micro_batch_size=args.micro_batch if args.max_tokens_per_micro_batch is None else None,
        max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        activation_checkpointing=args.activation_checkpointing,
    )
    roles = [
        reference_role(args.model, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch),
        # the example's: the policy's body, a score head
        reward_model_role(args.model, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch),
        critic_role(CriticConfig(critic)),
    ]
    g, placed = args.gpus, tuple(r.placement for r in roles)
    spec = TopologySpec(nodes=1, gpus_per_node=g, trainer_world_size=g, engines=g, roles=placed)
    return role_loads(roles, plan(spec))


def main(argv=None) -> int:
    """Parses, plans, prints the table; with ``--device-gib``, exits 1 if it does not fit."""
    p = _parser()
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model!r}: no config.json there; fix: pass a local HF model dir")
    if args.device_gib is not None and args.device_gib <= 0:
        p.error(f"--device-gib {args.device_gib}: must be > 0; fix: the GPU's memory in GiB")
    try:
        settings = MemorySettings(
            trainer_ranks=args.gpus,
            engine_tp=args.tp,
            zero_stage=args.zero_stage,
            train_dtype_bytes=_DTYPE[args.train_dtype],
            engine_dtype_bytes=_DTYPE[args.engine_dtype],
            sleep_level=args.sleep_level,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * GIB),
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
            activation_checkpointing=args.activation_checkpointing,
            bucket_bytes=args.bucket_mib << 20,
            cuda=not args.cpu,
        )
        capacity = int(args.device_gib * GIB) if args.device_gib else None
        roles = _ppo_roles(args) if args.ppo else []
        plan = plan_memory(model_shape(args.model), settings, capacity, roles)
    except MemoryPlanError as exc:
        print(f"does not fit: {exc}")
        return 1
    except (ValueError, OSError) as exc:  # bad settings, or a config.json that won't load
        p.error(str(exc))
    pool = Pool(args.pool)
    # the roles sit beside the trainer ranks: not on a separate engine pool's GPUs
    on_gpu = tuple(r.name for r in roles) if pool is not Pool.ENGINE else ()
    print(f"{plan.shape.params / 1e9:.3f}B parameters, {args.gpus} trainer ranks")
    print(plan.table(pool, on_gpu))
    if args.json:
        phases = plan.phases if not on_gpu else (*plan.phases, *plan.gpu(pool, on_gpu))
        rows = [
            {"pool": ph.pool.value, "phase": ph.phase, "total_bytes": ph.total}
            | {"roles": list(on_gpu) if ph not in plan.phases else []}
            | {"items": [[i.where.value, i.name, i.bytes] for i in ph.items]}
            for ph in phases
        ]
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if capacity:
        try:
            # One node holds every bundle: on CPU they share its host memory.
            bundles = [
                BundleMemory(f"gpu{g}", pool, capacity, "0", on_gpu) for g in range(args.gpus)
            ]
            check_plan(plan, bundles)
        except MemoryPlanError as exc:
            print(f"does not fit: {exc}")
            return 1
        per = "of host memory per node (CPU run)" if args.cpu else "per GPU"
        print(f"fits: every phase within {args.device_gib:g} GiB {per}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
