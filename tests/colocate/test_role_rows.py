"""The roles' part of the hand-over table, checked by walking the table (pure, no Ray).

Along every path of the loop, each role's memory state (as the planned calls leave it) must be
RESIDENT exactly in the phases it names, on a shared GPU; and no row makes a call for nothing.
"""

import itertools

import pytest

from colocate.core.contract import RoleTenant
from colocate.core.handovers import (
    INIT,
    RECOVER,
    ROLLOUT,
    SCORE,
    SKIP_SYNC,
    START,
    SYNC,
    TRAIN,
    Context,
    plan_handover,
)
from colocate.core.phases import Phase
from colocate.roles.base import RESIDENT_PHASES
from placement import RoleSpec, TenantKind, TopologySpec, plan

pytestmark = pytest.mark.fast

_PATHS = [
    (SCORE, TRAIN, SYNC, ROLLOUT),  # the PPO / GRPO-with-KL loop
    (TRAIN, SYNC, ROLLOUT),  # no scoring this step
    (SCORE, TRAIN, SKIP_SYNC),
]


def _walk(phases: frozenset[Phase]):
    spec = TopologySpec(
        nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2, roles=(RoleSpec("r"),)
    )
    p = plan(spec)
    ctx = Context(master=("127.0.0.1", 1), role_phases=(("r", phases),))
    state = {}  # rank -> resident?
    calls = 0
    phase = Phase.INIT

    def run(row):
        nonlocal calls, phase
        h = plan_handover(row, p, ctx, phase)
        known = phase is not Phase.FAILED  # from FAILED a call may find nothing to do
        phase = row.target
        for c in (*h.releases, *h.acquires):
            if c.actor.kind is not TenantKind.ROLE:
                continue
            calls += 1
            if c.verb is RoleTenant.start:
                state[c.actor.index] = False
            else:
                want = c.verb is RoleTenant.reload
                if known:
                    assert state[c.actor.index] != want, (
                        f"{row.name}: {c.verb.__name__} for nothing"
                    )
                state[c.actor.index] = want
            # a role's release is planned before any acquisition on its GPU
            if c in h.acquires:
                assert c.verb is not RoleTenant.offload
        assert set(state.values()) <= {row.target in phases}, (row.name, state)

    for row in (START, INIT, SYNC, ROLLOUT):  # roles start in init
        run(row)
    for path in _PATHS * 2:
        for row in path:
            run(row)
    phase = Phase.FAILED
    run(RECOVER)  # from FAILED: state unknown, every role moves to what TRAIN needs
    return calls


def test_roles_are_resident_exactly_in_their_phases_along_every_loop_path():
    for n in range(1, len(RESIDENT_PHASES) + 1):
        for phases in itertools.combinations(sorted(RESIDENT_PHASES, key=str), n):
            assert _walk(frozenset(phases)) > 0


def test_a_score_only_role_costs_two_calls_a_scored_step():
    """reload in ``score``, offload in ``train``; none in ``sync`` or ``rollout``."""
    spec = TopologySpec(
        nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1, roles=(RoleSpec("ref"),)
    )
    ctx = Context(role_phases=(("ref", frozenset({Phase.SCORE})),))
    p = plan(spec)

    def verbs(row, source):
        h = plan_handover(row, p, ctx, source)
        return [c.verb.__name__ for c in (*h.releases, *h.acquires) if c.actor.role]

    assert verbs(SCORE, Phase.ROLLOUT) == ["reload"]
    assert verbs(TRAIN, Phase.SCORE) == ["offload"] and verbs(TRAIN, Phase.ROLLOUT) == []
    assert verbs(SYNC, Phase.TRAIN) == [] and verbs(ROLLOUT, Phase.SYNC) == []
