"""The phase table and the timeline's ordering check: pure, no Ray."""

import pytest

from colocate.core.handovers import TRANSITIONS, check_transition
from colocate.core.phases import Phase, PhaseError, require
from colocate.operations.memory import MemoryReading
from colocate.operations.timeline import Span, Timeline

pytestmark = pytest.mark.fast


def test_legal_transitions_and_idempotence():
    assert check_transition(Phase.ROLLOUT, Phase.TRAIN) is True
    assert check_transition(Phase.TRAIN, Phase.TRAIN) is False  # already there: no-op
    with pytest.raises(PhaseError, match="cannot go from phase 'rollout' to 'init'"):
        check_transition(Phase.ROLLOUT, Phase.INIT)
    with pytest.raises(PhaseError, match="allowed next phases are none"):
        check_transition(Phase.SHUTDOWN, Phase.ROLLOUT)
    # Every phase but SHUTDOWN has a way forward; nothing leads back to INIT.
    assert all(TRANSITIONS[p] for p in Phase if p is not Phase.SHUTDOWN)
    assert not any(Phase.INIT in targets for targets in TRANSITIONS.values())


def test_require_names_action_and_phase():
    with pytest.raises(PhaseError, match=r"generate needs phase 'rollout'.*'train'"):
        require(Phase.TRAIN, Phase.ROLLOUT, "generate")
    with pytest.raises(PhaseError, match="call recover"):
        require(Phase.FAILED, (Phase.ROLLOUT, Phase.TRAIN), "train")


def _span(actor, lane, name, start, end, phase="train", step=1):
    mem = MemoryReading("rss", 1)
    return Span(actor, (lane,), name, phase, step, start, end, mem, mem)


def test_ordering_check_finds_an_early_acquisition():
    ok = Timeline()
    ok.extend(
        [
            _span("engine0", 0, "engine.sleep", 0.0, 1.0),
            _span("trainer0", 0, "trainer.reload", 1.0, 2.0),
            _span("engine1", 1, "engine.sleep", 0.0, 3.0),
            _span("trainer1", 1, "trainer.reload", 3.5, 4.0),
        ]
    )
    assert ok.ordering_violations() == []
    bad = Timeline()
    bad.extend(
        [
            _span("engine1", 1, "engine.sleep", 0.0, 3.0),
            _span("trainer1", 1, "trainer.reload", 2.0, 4.0),
            _span("trainer0", 0, "trainer.reload", 0.5, 1.0),  # other GPU: not a violation
        ]
    )
    (problem,) = bad.ordering_violations()
    assert "gpu1" in problem and "trainer1 trainer.reload" in problem and "engine.sleep" in problem
    # Different hand-overs (steps) are not compared with each other.
    other = Timeline()
    other.extend(
        [
            _span("engine0", 0, "engine.sleep", 5.0, 6.0, step=2),
            _span("trainer0", 0, "trainer.reload", 1.0, 2.0, step=1),
        ]
    )
    assert other.ordering_violations() == []


def test_a_preparation_is_no_acquisition_but_the_trainer_start_is():
    """The trainer's memory-free preparation may overlap an engine's sleep; its start may not."""
    prepared = Timeline()
    prepared.extend(
        [
            _span("engine0", 0, "engine.sleep", 0.0, 3.0, phase="init"),
            _span("trainer0", 0, "trainer.prepare", 1.0, 2.0, phase="init"),
            _span("trainer0", 0, "trainer.start", 3.0, 4.0, phase="init"),
        ]
    )
    assert prepared.ordering_violations() == []
    early = Timeline()
    early.extend(
        [
            _span("engine0", 0, "engine.sleep", 0.0, 3.0, phase="init"),
            _span("trainer0", 0, "trainer.start", 2.5, 4.0, phase="init"),
        ]
    )
    (problem,) = early.ordering_violations()
    assert "trainer0 trainer.start started 0.5000 s before engine0 engine.sleep" in problem


def test_startup_span_sum_adds_the_slowest_engine_and_the_slowest_trainer_rank():
    tl = Timeline()
    tl.extend(
        [
            _span("engine0", 0, "engine.start", 0.0, 30.0, phase="start"),
            _span("engine1", 1, "engine.start", 0.0, 31.0, phase="start"),
            # a rank's preparation and start add up: 4 + 9 = 13 s for trainer1
            _span("trainer0", 0, "trainer.prepare", 0.0, 5.0, phase="start"),
            _span("trainer0", 0, "trainer.start", 31.0, 38.0, phase="init"),
            _span("trainer1", 1, "trainer.prepare", 0.0, 4.0, phase="start"),
            _span("trainer1", 1, "trainer.start", 31.0, 40.0, phase="init"),
            # a restart's spans are not start-up
            _span("engine0", 0, "engine.start", 50.0, 90.0, phase="restart-engines"),
        ]
    )
    assert tl.startup_span_sum() == pytest.approx(31.0 + 13.0)
    assert Timeline().startup_span_sum() == 0.0


def test_the_trainer_start_is_split_over_the_start_up_rows():
    """``init`` holds both parts: the preparation waits for nothing, the start for the sleep."""
    from colocate.core.contract import EngineTenant, TrainerTenant
    from colocate.core.handovers import INIT, RESTART_TRAINERS, START, Context, plan_handover
    from placement import TopologySpec, plan

    p = plan(TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2))
    ctx = Context(master=("127.0.0.1", 1), collective_timeout_s=9.0)
    start, init = plan_handover(START, p, ctx), plan_handover(INIT, p, ctx)
    assert [(c.actor.name, c.verb) for c in init.prepares] == [
        ("trainer0", TrainerTenant.prepare),
        ("trainer1", TrainerTenant.prepare),
    ]
    assert all(c.args == (("127.0.0.1", 1), 9.0) for c in init.prepares)
    assert {c.verb for c in init.releases} == {EngineTenant.sleep}
    assert {c.verb for c in init.acquires} == {TrainerTenant.start}
    assert {c.verb for c in start.acquires} == {EngineTenant.start}
    assert not start.releases and not start.prepares
    restart = plan_handover(RESTART_TRAINERS, p, ctx)
    assert {c.verb for c in restart.prepares} == {TrainerTenant.prepare}
    with pytest.raises(ValueError, match="needs Context.master"):
        plan_handover(INIT, p, Context())


def test_chrome_trace_and_png(tmp_path):
    tl = Timeline()
    tl.extend(
        [
            _span("engine0", 0, "engine.sleep", 0.0, 1.0),
            _span("trainer0", 0, "trainer.reload", 1.0, 2.0),
        ]
    )
    import json

    trace = json.loads(tl.to_chrome_trace(tmp_path / "t.json").read_text())
    names = {e["name"] for e in trace["traceEvents"]}
    assert {"engine.sleep", "trainer.reload", "process_name"} <= names
    assert any(e["ph"] == "C" and "rss" in e["name"] for e in trace["traceEvents"])
    png = tl.to_png(tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
