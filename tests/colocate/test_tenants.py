"""Every model on the GPUs is a tenant group described one way (pure: no Ray, no actor)."""

import pytest
from fakes import fake_loss, fake_model_dir

from colocate import EngineConfig, Phase, Role, RoleActor, TrainerConfig
from colocate.core.contract import EngineTenant, RoleTenant, Tenant, TrainerTenant
from colocate.core.run_config import RunConfig
from colocate.core.tenants import tenant_groups
from placement import TenantKind, TopologySpec, plan

pytestmark = pytest.mark.fast


class Judge(RoleActor):
    """A frozen user role: the contract's defaults."""

    def judge(self, batch: dict) -> list:
        return []


class Learner(RoleActor):
    """A user role that trains in a group of its own, like the critic."""

    collective = True
    stateful = True
    trainable = True


def _config(tmp_path) -> RunConfig:
    model = fake_model_dir(tmp_path / "model")
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2)
    roles = (
        Role("judge", Judge, None, frozenset({Phase.SCORE})),
        Role("learner", Learner, None, frozenset({Phase.SCORE, Phase.TRAIN}), (1,)),
    )
    return RunConfig(
        spec, EngineConfig(model=model), TrainerConfig(model=model), fake_loss, roles=roles
    )


def test_every_tenant_is_a_group_with_the_capabilities_its_class_declares(tmp_path):
    config = _config(tmp_path)
    groups = {g.name: g for g in tenant_groups(config, plan(config.spec))}
    assert list(groups) == ["engine", "trainer", "judge", "learner"]
    caps = {n: (g.collective, g.stateful, g.trainable) for n, g in groups.items()}
    assert caps == {
        "engine": (False, False, False),
        "trainer": (True, True, True),
        "judge": (False, False, False),
        "learner": (True, True, True),
    }
    # Defaults live on the contract; each kind declares its own there.
    assert (Tenant.collective, Tenant.stateful, Tenant.trainable) == (False, False, False)
    assert not EngineTenant.stateful and not RoleTenant.stateful and TrainerTenant.stateful
    assert [a.name for a in groups["judge"].ranks] == ["judge0", "judge1"]
    assert groups["judge"].bundles == ((0,), (1,))  # beside each trainer rank
    assert [a.name for a in groups["learner"].ranks] == ["learner0"]
    assert groups["learner"].bundles == ((1,),)
    assert groups["learner"].phases == {Phase.SCORE, Phase.TRAIN}
    assert groups["engine"].kind is TenantKind.ENGINE and groups["engine"].config is config.engine
    assert groups["trainer"].actor_cls is config.trainer_cls


def test_a_checkpoint_holds_the_trainer_at_its_root_and_every_other_group_beside_it(tmp_path):
    config = _config(tmp_path)
    groups = {g.name: g for g in tenant_groups(config, plan(config.spec))}
    assert groups["trainer"].checkpoint_dir("/ck") == "/ck"
    assert groups["learner"].checkpoint_dir("/ck") == "/ck/learner"


def test_every_tenant_class_has_the_one_constructor_of_the_contract():
    """``cls(seat)``: spawn, restart and a user's subclass all build a tenant the same way."""
    import inspect

    from colocate import (
        CriticActor,
        EngineActor,
        FrozenModelActor,
        ReferenceActor,
        RewardModelActor,
        TrainerActor,
    )

    classes = [
        Tenant,
        EngineActor,
        TrainerActor,
        RoleActor,
        FrozenModelActor,
        ReferenceActor,
        RewardModelActor,
        CriticActor,
        Judge,
    ]
    for cls in classes:
        # (ray.remote adds a tracing keyword to a class it wraps: not part of the contract.)
        names = [n for n in inspect.signature(cls.__init__).parameters if not n.startswith("_ray")]
        assert names == ["self", "seat"], cls
