"""Planner unit tests: pure, no Ray."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement import TenantKind, TopologyError, TopologySpec, plan
from placement.spec import ClusterInfo, NodeInfo

pytestmark = pytest.mark.fast


def test_issue_example():
    spec = TopologySpec(nodes=2, gpus_per_node=4, trainer_world_size=8, engines=4, engine_tp=2)
    p = plan(spec)
    assert [p.trainer_bundle(r) for r in range(8)] == list(range(8))
    assert p.engine_bundles(0) == (0, 1)
    assert p.engine_bundles(3) == (6, 7)
    assert [p.node_of(b) for b in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert p.shared_bundles == tuple(range(8))
    assert spec.trainer_fraction == spec.engine_fraction == 0.5
    assert [str(t) for t in p.tenants_of(5)] == ["trainer[5]", "engine[2].tp1"]
    assert p.bundles_of_node(1) == (4, 5, 6, 7)
    assert p.bundles[0].resources == {"GPU": 1.0, "CPU": 0.2}


def test_separate_pools():
    spec = TopologySpec(
        nodes=2, gpus_per_node=4, trainer_world_size=2, engines=3, engine_tp=2, colocate=False
    )
    p = plan(spec)
    assert [p.trainer_bundle(r) for r in range(2)] == [0, 1]
    assert [p.engine_bundles(e) for e in range(3)] == [(2, 3), (4, 5), (6, 7)]
    assert p.shared_bundles == ()
    assert spec.trainer_fraction == spec.engine_fraction == 1.0
    assert spec.actor_cpus == pytest.approx(0.2)


def test_one_fraction_given_derives_the_other():
    spec = TopologySpec(
        nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2, trainer_gpu_fraction=0.7
    )
    assert spec.engine_fraction == pytest.approx(0.3)
    assert spec.actor_cpus == pytest.approx(0.1)


def test_plan_is_deterministic():
    spec = TopologySpec(nodes=3, gpus_per_node=4, trainer_world_size=12, engines=3, engine_tp=4)
    assert plan(spec) == plan(spec)


def test_out_of_range_lookups():
    p = plan(TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2))
    with pytest.raises(TopologyError, match="trainer rank=2"):
        p.trainer_bundle(2)
    with pytest.raises(TopologyError, match="engine=-1"):
        p.engine_bundles(-1)
    with pytest.raises(TopologyError, match="bundle=9"):
        p.node_of(9)


BAD_SPECS = [
    (dict(nodes=0), "nodes=0", "integer >= 1"),
    (dict(gpus_per_node=-1), "gpus_per_node=-1", "integer >= 1"),
    (dict(trainer_world_size=0), "trainer_world_size=0", ">= 1"),
    (dict(engines=0), "engines=0", ">= 1"),
    (dict(engine_tp=0), "engine_tp=0", ">= 1"),
    (dict(nodes=1.5), "nodes=1.5", "must be an int"),
    (dict(nodes=True), "nodes=True", "must be an int"),
    (dict(engine_tp=8, engines=1), "engine_tp=8", "engine_tp <= 4"),
    (dict(engine_tp=3, engines=2), "engine_tp=3", "divisor of 4"),
    (dict(trainer_world_size=6), "trainer_world_size=6", "trainer_world_size=8"),
    (dict(engines=2), "engines=2", "engines=8"),
    (dict(trainer_gpu_fraction=0.6, engine_gpu_fraction=0.6), "= 1.2 > 1", "sum to at most 1"),
    (dict(trainer_gpu_fraction=math.nan), "trainer_gpu_fraction=nan", "not finite"),
    (dict(engine_gpu_fraction=math.inf), "engine_gpu_fraction=inf", "not finite"),
    (dict(engine_gpu_fraction=0.0), "engine_gpu_fraction=0.0", "outside (0, 1]"),
    (dict(trainer_gpu_fraction=1.5), "trainer_gpu_fraction=1.5", "outside (0, 1]"),
    (dict(trainer_gpu_fraction=1.0), "trainer_gpu_fraction=1.0", "below 1"),
    (dict(cpus_per_bundle=0), "cpus_per_bundle=0", "must be > 0"),
    (dict(cpus_per_bundle=math.nan), "cpus_per_bundle=nan", "finite"),
    (dict(colocate="yes"), "colocate='yes'", "True or False"),
    (dict(colocate=False, trainer_world_size=4), "trainer_world_size=4", "trainer_world_size=0"),
]


@pytest.mark.parametrize("override,names,fix", BAD_SPECS)
def test_bad_specs_name_field_value_and_fix(override, names, fix):
    base = dict(nodes=2, gpus_per_node=4, trainer_world_size=8, engines=8, engine_tp=1)
    with pytest.raises(TopologyError) as err:
        TopologySpec(**{**base, **override})
    msg = str(err.value)
    assert names in msg and fix in msg, msg


def test_cluster_check():
    cluster = ClusterInfo(nodes=(NodeInfo("a", "10.0.0.1", 4, 8), NodeInfo("b", "10.0.0.2", 2, 8)))
    spec = TopologySpec(nodes=2, gpus_per_node=4, trainer_world_size=8, engines=8)
    with pytest.raises(TopologyError, match=r"nodes=2.*only 1 node\(s\) with >= 4 GPUs"):
        plan(spec, cluster)
    one = TopologySpec(nodes=1, gpus_per_node=4, trainer_world_size=4, engines=4)
    assert plan(one, cluster).spec is one
    greedy = TopologySpec(
        nodes=1, gpus_per_node=4, trainer_world_size=4, engines=4, cpus_per_bundle=4
    )
    with pytest.raises(TopologyError, match="cpus_per_bundle=4.*need 16 CPUs per node"):
        plan(greedy, cluster)


@st.composite
def valid_specs(draw):
    nodes = draw(st.integers(1, 4))
    gpn = draw(st.sampled_from([1, 2, 4, 8]))
    tp = draw(st.sampled_from([d for d in (1, 2, 4, 8) if gpn % d == 0]))
    total = nodes * gpn
    colocate = draw(st.booleans())
    if colocate:
        trainer, engines = total, total // tp
        fractions = draw(st.sampled_from([(None, None), (0.25, None), (None, 0.8), (0.3, 0.7)]))
    else:
        engines = draw(st.integers(1, total // tp - 1)) if total // tp > 1 else 0
        if engines == 0:
            colocate, trainer, engines = True, total, total // tp
        else:
            trainer = total - engines * tp
        fractions = (None, None)
    return TopologySpec(
        nodes=nodes,
        gpus_per_node=gpn,
        trainer_world_size=trainer,
        engines=engines,
        engine_tp=tp,
        colocate=colocate,
        trainer_gpu_fraction=fractions[0],
        engine_gpu_fraction=fractions[1],
        cpus_per_bundle=draw(st.sampled_from([0.1, 0.2, 1.0])),
    )


@settings(max_examples=300, deadline=None)
@given(valid_specs())
def test_valid_specs_keep_every_invariant(spec):
    p = plan(spec)
    assert len(p.bundles) == spec.total_gpus
    # Every GPU used as the spec says.
    for b in p.bundles:
        kinds = sorted(t.kind.value for t in b.tenants)
        assert kinds == (["engine", "trainer"] if spec.colocate else kinds) and len(kinds) >= 1
        assert len(b.tenants) == spec.tenants_per_gpu
        fraction = sum(
            spec.trainer_fraction if t.kind is TenantKind.TRAINER else spec.engine_fraction
            for t in b.tenants
        )
        assert fraction <= 1 + 1e-9
        assert b.node == b.index // spec.gpus_per_node
    # Trainer ranks in node-major order.
    trainer_bundles = [p.trainer_bundle(r) for r in range(spec.trainer_world_size)]
    assert trainer_bundles == sorted(trainer_bundles)
    assert [p.node_of(b) for b in trainer_bundles] == sorted(p.node_of(b) for b in trainer_bundles)
    # Each engine's TP ranks on one node, on distinct GPUs; no GPU used by two engine workers.
    seen = set()
    for e in range(spec.engines):
        bundles = p.engine_bundles(e)
        assert len(bundles) == spec.engine_tp == len(set(bundles))
        assert len({p.node_of(b) for b in bundles}) == 1
        assert not seen & set(bundles)
        seen |= set(bundles)
    assert len(seen) == spec.engines * spec.engine_tp


@st.composite
def invalid_specs(draw):
    base = dict(nodes=2, gpus_per_node=4, trainer_world_size=8, engines=8, engine_tp=1)
    field = draw(
        st.sampled_from(
            [
                "nodes",
                "gpus_per_node",
                "trainer_world_size",
                "engines",
                "engine_tp",
                "trainer_gpu_fraction",
                "engine_gpu_fraction",
                "cpus_per_bundle",
            ]
        )
    )
    if field.endswith("fraction"):
        bad = draw(
            st.one_of(
                st.floats(max_value=0.0, allow_nan=False),
                st.floats(min_value=1.0, exclude_min=False, allow_nan=False),
                st.just(math.nan),
            )
        )
    elif field == "cpus_per_bundle":
        bad = draw(st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan)))
    else:
        bad = draw(st.one_of(st.integers(max_value=0), st.integers(min_value=9, max_value=64)))
    return {**base, field: bad}


@settings(max_examples=300, deadline=None)
@given(invalid_specs())
def test_invalid_specs_raise_topology_error(kwargs):
    with pytest.raises(TopologyError):
        TopologySpec(**kwargs)
