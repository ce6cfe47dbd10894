"""Placement benchmark: time to plan and reserve 64 bundles on a simulated Ray cluster.

Builds a ``ray.cluster_utils.Cluster`` on this machine (a head with 1 CPU and no GPUs, plus
``--nodes`` nodes of ``--gpus-per-node`` logical GPUs and ``--node-cpus`` CPUs each; default
8 x 8 x 2), then measures, for a colocated spec with one bundle per GPU (default: nodes=8,
gpus_per_node=8, trainer_world_size=64, engines=32, engine_tp=2, cpus_per_bundle=0.2):

- ``plan``: ``placement.plan(spec)`` (pure, no Ray), ``--plan-iters`` calls, median in
  microseconds. ``TopologySpec(...)`` construction (the validation) is timed the same way.
- ``reserve``: ``placement.reserve(plan, timeout_s=...)`` end to end, ``--repeats`` times,
  each followed by ``release()`` and a wait until all GPUs are available again (that wait is
  not part of the figure). Each repeat is split into the phases ``reserve`` times itself
  (``Reservation.timings``): ``check`` (the feasibility check), ``ready`` (creating the
  per-node ``STRICT_PACK`` groups and waiting for them) and ``probe`` (one probe task per
  bundle, which also reads each bundle's accelerator).
- Diagnostics. Ray gives a remote function that asks for GPUs ``max_calls=1`` by default,
  so every probe task (``num_gpus=0.01``) runs in a new worker process that exits after it.
  While each reservation is held, ``seq probe`` runs the same probe with ``max_calls=0`` and
  one task per node at a time (bundle 0 of every group, then bundle 1, ...), so that each
  node's tasks can reuse one worker process; it reports the time and the distinct worker
  processes used. Once at the end: two tasks back to back, with the default ``max_calls`` and
  with ``max_calls=0`` (time of each, and whether the second reused the first's process).

Ray may print "(raylet) A worker died or was killed ..." lines: removing a placement group kills
the worker processes still held in it (the diagnostic's reusable ones, or probe workers that have
not exited yet). They are expected and do not affect the figures.

The simulated nodes are processes on one machine: the figures are for this machine's CPUs, not
for a real cluster.

Run: ``.venv/bin/python benchmarks/bench_placement.py [--json out.json]`` (minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import ray
from common import code_version, median, write_json
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from placement import TopologySpec, plan, reserve


# The module, not the function of the same name that ``placement`` re-exports.
def _pid() -> int:
    return os.getpid()


# Same shape as placement.reservation's probe. A remote function that asks for GPUs defaults to
# ``max_calls=1`` in Ray (its worker process exits after one call); ``max_calls=0`` lifts that.
_pid_default = ray.remote(num_cpus=0.01, num_gpus=0.01)(_pid)
_pid_reusable = ray.remote(num_cpus=0.01, num_gpus=0.01, max_calls=0)(_pid)


def _time_pure(fn, iters: int) -> list[int]:
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def _sequential_probe(res) -> tuple[float, int]:
    """Probes bundle i of every group at once, for i = 0, 1, ..., with ``max_calls=0``.

    Returns the seconds taken and the number of distinct worker processes used.
    """
    groups = res.placement_groups
    pids = []
    t0 = time.perf_counter()
    for i in range(res.plan.spec.gpus_per_node):
        refs = [
            _pid_reusable.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i
                )
            ).remote()
            for pg in groups
        ]
        pids += ray.get(refs, timeout=120)
    return time.perf_counter() - t0, len(set(pids))


def _two_tasks(fn) -> dict:
    """Two tasks back to back: seconds each, and whether the second reused the first's worker."""
    t0 = time.perf_counter()
    first = ray.get(fn.remote(), timeout=120)
    t1 = time.perf_counter()
    second = ray.get(fn.remote(), timeout=120)
    t2 = time.perf_counter()
    return {"first_s": t1 - t0, "second_s": t2 - t1, "same_worker": first == second}


def _wait_all_gpus_free(total: float, timeout_s: float = 60.0) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if ray.available_resources().get("GPU", 0.0) >= total - 1e-6:
            return
        time.sleep(0.05)
    raise TimeoutError(f"GPUs not all free {timeout_s:g} s after release")


def _run(args: argparse.Namespace, spec: TopologySpec, spec_kwargs: dict) -> dict:
    p = plan(spec)
    total = spec.total_gpus
    spec_ns = _time_pure(lambda: TopologySpec(**spec_kwargs), args.plan_iters)
    plan_ns = _time_pure(lambda: plan(spec), args.plan_iters)

    cluster = None
    try:
        t0 = time.perf_counter()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
        )
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=args.node_cpus, num_gpus=args.gpus_per_node)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        cluster.wait_for_nodes()
        cluster_start_s = time.perf_counter() - t0

        repeats = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            res = reserve(p, timeout_s=args.timeout_s)
            reserve_s = time.perf_counter() - t0
            try:
                seq_s, seq_workers = _sequential_probe(res)
            finally:
                res.release()
            _wait_all_gpus_free(float(total))
            repeats.append(
                {
                    "repeat": i,
                    "reserve_s": reserve_s,
                    **res.timings,  # check_s, ready_s, probe_s: measured by reserve itself
                    "seq_probe_s": seq_s,
                    "seq_probe_workers": seq_workers,
                }
            )
        two_default = _two_tasks(_pid_default)
        two_reusable = _two_tasks(_pid_reusable)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()

    def med(key: str) -> float:
        return median(r[key] for r in repeats)

    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "platform": platform.platform(),
        },
        "cluster": {
            "head": {"num_cpus": 1, "num_gpus": 0},
            "nodes": args.nodes,
            "gpus_per_node": args.gpus_per_node,
            "node_cpus": args.node_cpus,
            "start_s": cluster_start_s,
        },
        "spec": spec_kwargs,
        "bundles": len(p.bundles),
        "plan_iters": args.plan_iters,
        "spec_validate_median_us": median(spec_ns) / 1e3,
        "plan_median_us": median(plan_ns) / 1e3,
        "reserve_timeout_s": args.timeout_s,
        "reserve": repeats,
        "reserve_median_s": med("reserve_s"),
        "ready_median_s": med("ready_s"),
        "probe_median_s": med("probe_s"),
        "seq_probe_median_s": med("seq_probe_s"),
        "two_tasks_default_max_calls": two_default,
        "two_tasks_max_calls_0": two_reusable,
        "code": code_version(),
    }


def _print(r: dict) -> None:
    c = r["cluster"]
    print(
        f"cluster: head (1 CPU, 0 GPU) + {c['nodes']} nodes x {c['gpus_per_node']} logical GPUs"
        f" x {c['node_cpus']:g} CPUs, simulated on {r['machine']['cpus']} CPUs"
        f" (started in {c['start_s']:.1f} s); ray {r['machine']['ray']}"
    )
    s = r["spec"]
    print(
        f"spec: nodes={s['nodes']} gpus_per_node={s['gpus_per_node']} "
        f"trainer_world_size={s['trainer_world_size']} engines={s['engines']} "
        f"engine_tp={s['engine_tp']} cpus_per_bundle={s['cpus_per_bundle']:g} "
        f"-> {r['bundles']} bundles"
    )
    print(
        f"TopologySpec(...) median {r['spec_validate_median_us']:.1f} us; "
        f"plan(spec) median {r['plan_median_us']:.1f} us ({r['plan_iters']} calls each)"
    )
    header = (
        f"{'repeat':>6} {'reserve s':>10} {'check s':>8} {'ready s':>8} {'probe s':>8} "
        f"{'seq probe s':>12} {'seq workers':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in r["reserve"]:
        print(
            f"{row['repeat']:>6} {row['reserve_s']:>10.3f} {row['check_s']:>8.3f} "
            f"{row['ready_s']:>8.3f} {row['probe_s']:>8.3f} "
            f"{row['seq_probe_s']:>12.3f} {row['seq_probe_workers']:>12}"
        )
    print(
        f"{'median':>6} {r['reserve_median_s']:>10.3f} {'':>8} {r['ready_median_s']:>8.3f} "
        f"{r['probe_median_s']:>8.3f} {r['seq_probe_median_s']:>12.3f}"
    )
    print(
        "ready = reserve - check - probe (create the STRICT_PACK groups, wait for them); "
        "seq probe: diagnostic, one probe per node at a time, max_calls=0"
    )
    for label, key in (
        ("default max_calls (1 for GPU tasks)", "two_tasks_default_max_calls"),
        ("max_calls=0", "two_tasks_max_calls_0"),
    ):
        t = r[key]
        print(
            f"two tasks back to back, {label}: {t['first_s']:.3f} s then {t['second_s']:.3f} s "
            f"({'same' if t['same_worker'] else 'new'} worker process for the second)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8, help="simulated GPU nodes (default 8)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="logical GPUs per node")
    parser.add_argument("--node-cpus", type=float, default=2, help="Ray CPUs per GPU node")
    parser.add_argument("--engine-tp", type=int, default=2, help="engine tensor-parallel size")
    parser.add_argument("--cpus-per-bundle", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3, help="reserve repeats (>= 3)")
    parser.add_argument("--plan-iters", type=int, default=2000, help="plan() calls timed")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="reserve timeout_s")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")

    total = args.nodes * args.gpus_per_node
    spec_kwargs = dict(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        trainer_world_size=total,
        engines=total // args.engine_tp,
        engine_tp=args.engine_tp,
        cpus_per_bundle=args.cpus_per_bundle,
    )
    spec = TopologySpec(**spec_kwargs)  # validates before any process is started
    result = _run(args, spec, spec_kwargs)
    _print(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
