"""Shared fixtures: a local Ray with logical GPUs, a simulated multi-node cluster, the tiny model.

Ray is started at most once per mode and shared between tests; a test that needs the other
mode shuts the running one down first. Every actor in these tests asks for fractional CPUs
(the machine has 2 cores), and every ``ray.get`` has a timeout.
"""

from __future__ import annotations

import pytest
from raysupport import RayState, ensure_local_ray, shutdown_ray


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _ray_teardown():
    yield
    shutdown_ray()


@pytest.fixture
def ray_local():
    """A single-node local Ray with ``LOCAL_GPUS`` logical GPUs and 2 CPUs; shared."""
    return ensure_local_ray()


@pytest.fixture(scope="module")
def ray_local_module():
    """The same local Ray, for module-scoped fixtures (e.g. one coordinator for many tests)."""
    return ensure_local_ray()


@pytest.fixture
def no_leftover_placement_groups():
    """Fails the test if it leaves placement groups reserved."""
    import ray

    yield
    _assert_no_leftover_placement_groups(ray)


@pytest.fixture
def ray_cluster():
    """A simulated cluster: a head without GPUs plus 3 nodes of 4 logical GPUs each."""
    import ray
    from ray.cluster_utils import Cluster

    if RayState.mode != "cluster" or not ray.is_initialized():
        shutdown_ray()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
        )
        for _ in range(3):
            cluster.add_node(num_cpus=1, num_gpus=4)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        RayState.cluster = cluster
        RayState.mode = "cluster"
    return RayState.cluster


def _assert_no_leftover_placement_groups(ray) -> None:
    """Fails the test that left placement groups reserved (after removing them)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table

    alive = [k for k, v in placement_group_table().items() if v.get("state") != "REMOVED"]
    for pg_id in alive:
        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    if alive:
        pytest.fail(f"test left {len(alive)} placement group(s) reserved")


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The tiny Llama's directory (built once per content key, cached across runs)."""
    from colocate.testing.tiny_model import build_tiny_model

    return str(build_tiny_model())
