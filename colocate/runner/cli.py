"""``colocate-rl`` (also ``python -m colocate``): train, print or plan a recipe.

Subcommands, each taking ``--config FILE`` and ``key=value`` overrides:

- ``train``: runs the recipe (``colocate.runner.loop``). A recipe that cannot work (a key, a
  value, the data, the rewards, the model, a checkpoint to resume) exits 2 with
  ``colocate-rl train: error: key=value: problem; fix: fix`` before Ray starts.
- ``config``: prints the resolved recipe as YAML (every default filled in).
- ``plan``: prints the memory each GPU holds in each phase of the recipe's run, itemised, as
  the coordinator's pre-launch check plans it, without starting Ray; with ``--gpu-memory-gib``
  it also checks the plan against GPUs of that size and exits 1 if it does not fit.

Exit statuses: 0 done, 1 the plan does not fit, 2 a refused recipe or bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

PROG = "colocate-rl"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("colocate-rl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Colocated RL from a recipe: a DeepSpeed trainer and vLLM engines on the "
        "same GPUs.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("-c", "--config", metavar="FILE", help="the YAML recipe")
        c.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides of the recipe (trainer.lr=1e-5 rollout.group_size=8)",
        )
        return c

    command("train", "run the recipe")
    command("config", "print the resolved recipe (every default filled in) as YAML")
    plan = command("plan", "print the recipe's memory plan per GPU and phase, without Ray")
    plan.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="plan CUDA GPUs, or a CPU run against host memory (default: cuda where torch "
        "sees a CUDA device, else cpu)",
    )
    plan.add_argument(
        "--gpu-memory-gib",
        type=float,
        metavar="G",
        help="also check the plan against GPUs of G GiB (CPU: host memory per node); exit 1 "
        "if it does not fit",
    )
    return p


def _refuse(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from colocate.runner.recipe import load_recipe
    from colocate.runner.schema import RecipeError

    try:
        config = load_recipe(args.config, args.overrides)
        from colocate.runner.loop import prepare, run

        prepared = prepare(config)  # every data, reward, model and resume check; no Ray yet
    except RecipeError as exc:
        return _refuse("train", str(exc))
    run(prepared)
    return 0


def _config(args: argparse.Namespace) -> int:
    from colocate.runner.recipe import load_recipe, to_yaml
    from colocate.runner.schema import RecipeError

    try:
        config = load_recipe(args.config, args.overrides)
    except RecipeError as exc:
        return _refuse("config", str(exc))
    sys.stdout.write(to_yaml(config))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from colocate.operations.memory_plan import GIB, MemoryPlanError, check_plan
    from colocate.runner.build import library_configs, memory_plan, resolve_model
    from colocate.runner.recipe import load_recipe
    from colocate.runner.schema import RecipeError
    from placement import DeviceKind

    gib = args.gpu_memory_gib
    if gib is not None and not gib > 0:
        return _refuse("plan", f"--gpu-memory-gib={gib!r}: must be > 0; fix: the GPU's GiB")
    try:
        config = load_recipe(args.config, args.overrides)
        model = resolve_model(config.model)
        configs = library_configs(config, model)
        device = DeviceKind(args.device or _default_device())
        memory, placed = memory_plan(config, configs, device)
    except RecipeError as exc:
        return _refuse("plan", str(exc))
    except MemoryPlanError as exc:
        return _does_not_fit(exc)
    roles = [r.name for r in configs.roles]
    spec = configs.spec
    layout = "colocated" if spec.colocate else "separate pools"
    print(f"model: {model} ({memory.shape.params / 1e9:.3f}B parameters)")
    print(
        f"topology: {_count(spec.total_gpus, 'GPU')}, {layout}: "
        f"{_count(spec.trainer_world_size, 'trainer rank')} "
        f"(ZeRO-{int(configs.trainer.zero_stage)}, {configs.trainer.dtype.value}), "
        f"{_count(spec.engines, 'engine')} x TP {spec.engine_tp}; "
        f"roles: {', '.join(roles) or 'none'}"
    )
    print(f"device: {device.value}")
    bundles = _bundles(placed, int(gib * GIB) if gib else 0)
    shown = []
    for b in bundles:  # one table per kind of GPU (every GPU of a kind holds the same)
        if (b.pool, b.roles) not in shown:
            shown.append((b.pool, b.roles))
            print()
            print(memory.table(b.pool, b.roles))
    if memory.not_counted:
        print(f"roles {list(memory.not_counted)}: their models are NOT COUNTED (size unknown)")
    if gib is None:
        return 0
    try:
        check_plan(memory, bundles)
    except MemoryPlanError as exc:
        return _does_not_fit(exc)
    per = "of host memory per node (CPU run)" if device is DeviceKind.CPU else "per GPU"
    print(f"fits: every phase within {gib:g} GiB {per}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _does_not_fit(error: Exception) -> int:
    # the check's fix names the library's field; the recipe's key is what a user changes
    message = str(error).replace(
        "TrainerConfig.max_tokens_per_micro_batch", "trainer.max_tokens_per_micro_batch"
    )
    print(f"{PROG} plan: does not fit: {message}", file=sys.stderr)
    return 1


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _bundles(placed, capacity: int) -> list:
    """Each bundle of the placement plan as the memory check sees it, ``capacity`` bytes each."""
    from colocate.operations.memory_plan import BundleMemory, Pool
    from placement import TenantKind

    out = []
    for slot in placed.bundles:
        # a role beside a trainer rank or an engine does not change which pool the GPU is of
        kinds = {t.kind for t in slot.tenants} - {TenantKind.ROLE}
        roles = tuple(sorted(t.role for t in slot.tenants if t.kind is TenantKind.ROLE))
        if kinds == {TenantKind.ENGINE, TenantKind.TRAINER}:
            pool = Pool.SHARED
        elif kinds == {TenantKind.ENGINE}:
            pool = Pool.ENGINE
        else:
            pool = Pool.TRAINER
        label = f"bundle {slot.index} (gpu {slot.local_gpu} of node {slot.node})"
        out.append(BundleMemory(label, pool, capacity, str(slot.node), roles))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``colocate-rl`` (see the module docstring); returns the exit status."""
    parser = _parser()
    # Overrides may come on either side of the options (``train a=1 -c r.yaml b=2``), which
    # argparse's positionals do not take: what is left over and is not an option is one too.
    args, extra = parser.parse_known_args(argv)
    options = [item for item in extra if item.startswith("-")]
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    args.overrides = [*args.overrides, *extra]
    handler = {"train": _train, "config": _config, "plan": _plan}[args.command]
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
