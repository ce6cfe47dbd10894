"""Roles in the pure planner: where their ranks go, the GPU shares, and the refusals."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement import RoleSpec, TenantKind, TopologyError, TopologySpec, plan

pytestmark = pytest.mark.fast


def _spec(**kw):
    base = dict(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    return TopologySpec(**{**base, **kw})


def test_roles_sit_beside_the_trainer_ranks_by_default():
    spec = _spec(roles=(RoleSpec("reference"), RoleSpec("reward", gpu_fraction=0.2)))
    p = plan(spec)
    assert p.role_bundles("reference") == (0, 1) and p.role_bundles("reward") == (0, 1)
    assert [str(t) for t in p.tenants_of(1)] == [
        "trainer[1]",
        "engine[1].tp0",
        "reference[1]",
        "reward[1]",
    ]
    # the roles take 0.3 of each GPU; trainer and engine split the rest
    assert spec.trainer_fraction == spec.engine_fraction == pytest.approx(0.35)
    assert spec.tenants_per_gpu == 4


def test_a_role_on_its_own_bundles_of_a_separate_pool():
    spec = _spec(
        gpus_per_node=3, trainer_world_size=2, engines=1, colocate=False,
        roles=(RoleSpec("judge", bundles=(2,), gpu_fraction=0.25),),
    )  # fmt: skip
    p = plan(spec)
    assert p.role_bundles("judge") == (2,)
    assert 2 in p.shared_bundles and 0 not in p.shared_bundles  # beside the engine only
    assert spec.engine_fraction == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("kw", "needle", "fix"),
    [
        (dict(roles=(RoleSpec("ref", bundles=(0, 5)),)), "bundle 5 does not exist", "0..1"),
        (
            dict(trainer_gpu_fraction=0.5, engine_gpu_fraction=0.4, roles=(RoleSpec("ref"),)),
            "trainer 0.5 + engine 0.4 + ref 0.1 = 1",
            None,
        ),
        (
            dict(trainer_gpu_fraction=0.5, engine_gpu_fraction=0.45, roles=(RoleSpec("ref"),)),
            "= 1.05 > 1",
            "lower RoleSpec.gpu_fraction",
        ),
        (dict(roles=(RoleSpec("ref"), RoleSpec("ref"))), "has a name twice", "its own name"),
        (
            dict(roles=tuple(RoleSpec(n, gpu_fraction=0.5) for n in ("a", "b"))),
            "no share",
            "lower RoleSpec.gpu_fraction",
        ),
    ],
)
def test_bad_role_placements_name_field_value_and_fix(kw, needle, fix):
    if fix is None:  # exactly 1: allowed
        _spec(**kw)
        return
    with pytest.raises(TopologyError) as err:
        _spec(**kw)
    assert needle in str(err.value) and fix in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(name="Ref"), "RoleSpec.name='Ref'"),
        (dict(name="engine"), "reserved"),
        (dict(name="ref", bundles=()), "bundles=()"),
        (dict(name="ref", bundles=(1, 1)), "distinct"),
        (dict(name="ref", gpu_fraction=1.0), "gpu_fraction=1.0"),
    ],
)
def test_bad_role_specs(kw, needle):
    with pytest.raises(TopologyError, match="fix:") as err:
        RoleSpec(**kw)
    assert needle in str(err.value)


@settings(deadline=None)  # a busy 2-core machine: timing is not what this asserts
@given(
    gpus=st.integers(1, 4),
    fractions=st.lists(st.sampled_from([0.05, 0.1, 0.2]), min_size=0, max_size=3),
    own=st.booleans(),
)
def test_every_gpu_sums_to_at_most_one(gpus, fractions, own):
    roles = tuple(
        RoleSpec(f"r{'x' * i}", bundles=(i % gpus,) if own else None, gpu_fraction=f)
        for i, f in enumerate(fractions)
    )
    spec = _spec(gpus_per_node=gpus, trainer_world_size=gpus, engines=gpus, roles=roles)
    p = plan(spec)
    for b in p.bundles:
        total = 0.0
        for t in b.tenants:
            if t.kind is TenantKind.ROLE:
                total += p.role_fraction(t.role)
            else:
                total += (
                    spec.trainer_fraction if t.kind is TenantKind.TRAINER else spec.engine_fraction
                )
        assert total <= 1 + 1e-9
