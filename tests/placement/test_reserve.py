"""Reservation on real Ray: logical GPUs on one node, and a simulated 3-node cluster."""

import time

import pytest
import ray
from raysupport import fake_cuda_probe

from placement import (
    DeviceKind,
    PlacementTimeoutError,
    TopologyError,
    TopologySpec,
    discover_cluster,
    plan,
    reserve,
)

pytestmark = [
    pytest.mark.fast,
    pytest.mark.timeout(240),
    pytest.mark.usefixtures("no_leftover_placement_groups"),
]


@ray.remote
class _WhereAmI:
    def where(self):
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), tuple(ray.get_gpu_ids())


def test_colocated_tenants_share_one_gpu(ray_local):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    with reserve(plan(spec), timeout_s=30) as res:
        actors = []
        for r in range(2):
            actors.append(_WhereAmI.options(**res.trainer_options(r)).remote())
            actors.append(_WhereAmI.options(**res.engine_launch(r).actor_options).remote())
        where = ray.get([a.where.remote() for a in actors], timeout=60)
        # Trainer r and engine r share a GPU; the two bundles use different GPUs.
        assert where[0][1] == where[1][1] and len(where[0][1]) == 1
        assert where[2][1] == where[3][1]
        assert where[0][1] != where[2][1]
        assert res.location(0).gpu_id == str(where[0][1][0])
        for a in actors:
            ray.kill(a)


def test_infeasible_request_times_out_with_message(ray_local):
    # Fits the spec check (4 logical GPUs) but not the free CPUs: never ready.
    spec = TopologySpec(
        nodes=1, gpus_per_node=4, trainer_world_size=4, engines=4, cpus_per_bundle=0.5
    )
    blocker = ray.util.placement_group([{"CPU": 1.5}])
    ray.get(blocker.ready(), timeout=30)
    try:
        start = time.monotonic()
        with pytest.raises(PlacementTimeoutError) as err:
            reserve(plan(spec), timeout_s=3)
        assert time.monotonic() - start < 15
        msg = str(err.value)
        assert "asked for 1 node(s) x 4 bundle(s)" in msg and "available now" in msg, msg
    finally:
        ray.util.remove_placement_group(blocker)


def test_more_nodes_than_cluster_raises_before_reserving(ray_local):
    spec = TopologySpec(nodes=2, gpus_per_node=4, trainer_world_size=8, engines=8)
    with pytest.raises(TopologyError, match="nodes=2.*only 1 node"):
        reserve(plan(spec), timeout_s=5)
    assert discover_cluster().nodes[0].gpus == 4


def test_probe_reports_each_bundles_device_from_its_node(ray_local):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    with reserve(plan(spec), timeout_s=60) as res:
        # This machine has no CUDA: Ray's GPUs are logical and the bundles say so.
        assert res.device is DeviceKind.CPU
        accel = res.accelerators
        assert len(accel) == 2 and all(a.kind is DeviceKind.CPU for a in accel)
        assert all(a.memory_kind == "host" and a.memory_bytes > 1 << 30 for a in accel)
        facts = res.hardware()
        assert facts["device"] == "cpu" and facts["source"] == "placement probe on each bundle"
        assert {b["gpu_id"] for b in facts["bundles"]} == {res.location(b).gpu_id for b in (0, 1)}


@ray.remote(num_cpus=0.01)
class _Counter:
    def __init__(self):
        self.n = 0

    def next(self):
        self.n += 1
        return self.n


def test_bundles_of_mixed_device_kinds_are_refused_and_released(ray_local):
    counter = _Counter.remote()

    @ray.remote(num_cpus=0.01, num_gpus=0.01, max_calls=0)
    def half_cuda():
        from placement.hardware import Accelerator

        gpu = str(ray.get_gpu_ids()[0])
        first = ray.get(counter.next.remote(), timeout=30) == 1
        kind = DeviceKind.CUDA if first else DeviceKind.CPU
        node = ray.get_runtime_context().get_node_id()
        return node, "127.0.0.1", gpu, Accelerator(kind, "x", 1 << 30, "127.0.0.1", gpu)

    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    with pytest.raises(TopologyError, match=r"mix device kinds \(bundle 0 .* is (cuda|cpu)"):
        reserve(plan(spec), timeout_s=60, probe=half_cuda)
    ray.kill(counter)  # and no placement group is left reserved (the fixture checks)


# Last in the module: the simulated cluster replaces the local Ray the tests above share, and
# nothing after it here needs the local one back (a restart costs seconds).
def test_multi_node_tp_never_spans_nodes_and_order_is_stable(ray_cluster):
    spec = TopologySpec(nodes=3, gpus_per_node=4, trainer_world_size=12, engines=6, engine_tp=2)
    p = plan(spec)
    layouts = []
    for _ in range(2):
        # The probe reports CUDA bundles: the TP > 1 launch path for vLLM's Ray executor.
        with reserve(p, timeout_s=60, probe=fake_cuda_probe()) as res:
            assert res.device is DeviceKind.CUDA
            locs = [res.location(b) for b in range(12)]
            for e in range(spec.engines):
                nodes = {locs[b].node_id for b in p.engine_bundles(e)}
                assert len(nodes) == 1
                launch = res.engine_launch(e)
                assert launch.executor_env["VLLM_RAY_BUNDLE_INDICES"] == ",".join(
                    str(locs[b].index_in_group) for b in p.engine_bundles(e)
                )
                assert launch.actor_options["num_gpus"] == 0
            # Ordered by (node, GPU id): 4 bundles per node, GPU ids ascending within a node.
            for node in range(3):
                group = [locs[b] for b in p.bundles_of_node(node)]
                assert len({g.node_id for g in group}) == 1
                assert [int(g.gpu_id) for g in group] == sorted(int(g.gpu_id) for g in group)
            assert len({loc.node_id for loc in locs}) == 3
            layouts.append([(loc.node_id, loc.gpu_id) for loc in locs])
    assert layouts[0] == layouts[1]
