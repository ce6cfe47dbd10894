"""The real coordinator over a fake fleet of tiny real Ray actors (no vLLM, no DeepSpeed).

Every row of the hand-over table and every recovery path runs here in seconds: the order of
memory moves is checked per GPU from the timeline, every memory state the actors report is
checked against the table, and every sync is verified by the real weight_sync machinery.
"""

from __future__ import annotations

import time

import pytest
from fakes import fake_coordinator, fake_model_dir
from raysupport import fake_cuda_probe

from colocate import (
    ActorFailedError,
    ColocateError,
    Fault,
    LoadFormat,
    Phase,
    PhaseError,
    Sampling,
    TrainerTenant,
)
from colocate.core.handovers import TABLE
from colocate.core.phases import RESIDENT
from placement import TenantKind, TopologySpec
from weight_sync import Backend, WeightSyncError

pytestmark = [pytest.mark.fast, pytest.mark.timeout(60)]

SAMPLING = Sampling(n=2, max_tokens=4)
PROMPTS = ["a", "b", "c", "d"]


def _coordinator(model_dir, spec=None, **kw):
    return fake_coordinator(model_dir, spec, **kw)


def _train(coord):
    completions = coord.generate(PROMPTS, SAMPLING)
    return coord.train({"x": [0] * len(completions)})


def _check_resident(coord):
    """Every actor on a shared GPU holds what the table says the current phase allows."""
    want = RESIDENT[coord.phase]
    for name, status in coord.actor_status().items():
        kind = TenantKind.ENGINE if name.startswith("engine") else TenantKind.TRAINER
        assert status["memory"] == want[kind].value, (coord.phase, name, status["memory"])


def _rows(timeline) -> set[str]:
    return {s.phase for s in timeline.spans if s.actor != "coordinator"}


def _check_order(timeline):
    assert timeline.ordering_violations() == []
    # Not vacuous: hand-overs with both a release and an acquisition on one GPU exist.
    from colocate.operations.timeline import ACQUIRE_STEPS, RELEASE_STEPS

    pairs = {}
    for s in timeline.spans:
        for lane in s.lanes:
            key = (lane, s.phase, s.step)
            kinds = pairs.setdefault(key, set())
            kinds.add("r" if s.name in RELEASE_STEPS else "a" if s.name in ACQUIRE_STEPS else "-")
    assert sum({"r", "a"} <= k for k in pairs.values()) >= 4


@pytest.fixture
def model_dir(tmp_path):
    return fake_model_dir(tmp_path / "fake-model")


# A started default coordinator that a test passed on after all its checks, so that the next
# test needs no start of its own: a start is four actor processes, each a Ray worker importing
# torch, and process starts are most of this module's time. At most one, for the next test only.
_PASSED_ON: list = []


def _pass_on(coord) -> None:
    """Hands ``coord`` to the next test; the last line of a test that passed."""
    _PASSED_ON.append(coord)


def _shut_down_passed_on() -> None:
    while _PASSED_ON:
        _PASSED_ON.pop().shutdown()


@pytest.fixture(autouse=True)
def _passed_on_to_the_next_test_only(request):
    """A test that does not take the passed-on coordinator frees its GPUs and processes first."""
    if "default_coordinator" not in request.fixturenames:
        _shut_down_passed_on()


@pytest.fixture(scope="module", autouse=True)
def _passed_on_shut_down_at_the_end():
    yield
    _shut_down_passed_on()


@pytest.fixture
def new_coordinator(ray_local, model_dir):
    """A newly started default coordinator: shut down after the test unless it was passed on."""
    coord = _coordinator(model_dir).__enter__()
    yield coord
    if not any(c is coord for c in _PASSED_ON):
        coord.shutdown()


@pytest.fixture
def default_coordinator(ray_local, model_dir):
    """A started default coordinator in ROLLOUT: the one passed on, else a new one.

    The test using it passes alone, after the test that passes one on, and in any order.
    """
    coord = _PASSED_ON.pop() if _PASSED_ON else _coordinator(model_dir).__enter__()
    try:
        assert coord.phase is Phase.ROLLOUT
        yield coord
    finally:
        coord.shutdown()


def test_every_row_of_the_loop_in_order(new_coordinator):
    coord = new_coordinator
    assert coord.phase is Phase.ROLLOUT and coord.weight_version == 1
    assert coord.sync_driver.setup_rounds == 3
    _check_resident(coord)
    rounds = coord.rounds
    first = coord.generate(PROMPTS, SAMPLING)
    coord.train({"x": [0] * len(first)})
    report = coord.sync()
    # One driver round each for generate, train (its hand-over chained) and sync (both
    # hand-overs, the transfer, the verification and the span collection chained).
    assert coord.rounds - rounds == 3
    _train(coord)
    _check_resident(coord)
    report = coord.sync()
    assert report.verified_tensors == 2 * len(coord.bucket_plan.metas) > 0
    assert report.applied_checked > 0
    _check_resident(coord)
    after = coord.generate(PROMPTS, SAMPLING)
    assert {c.weight_version for c in after} == {3}
    assert [c.token_ids for c in after] != [c.token_ids for c in first]  # new weights
    _train(coord)
    coord.skip_sync()
    _check_resident(coord)
    assert {c.weight_version for c in coord.generate(PROMPTS, SAMPLING)} == {3}
    _train(coord)
    coord.sync()
    timeline = coord.timeline
    _check_order(timeline)
    assert {"start", "init", "train", "sync", "rollout", "skip-sync"} <= _rows(timeline)
    # The trainer's start is split in the init row: prepared (waiting for nothing), started
    # after the engines' sleep on its GPU (checked above), each once per rank.
    for rank in ("trainer0", "trainer1"):
        (prep,) = [s for s in timeline.spans if s.actor == rank and s.name == "trainer.prepare"]
        (start,) = [s for s in timeline.spans if s.actor == rank and s.name == "trainer.start"]
        assert (prep.phase, start.phase) == ("init", "init") and prep.end <= start.start
    coordinator = {s.name for s in timeline.spans if s.actor == "coordinator"}
    assert {"reserve", "start", "generate", "train", "sync", "skip_sync"} <= coordinator
    _pass_on(coord)  # every check passed: the recovery test goes on with it


def _fail(coord, fn, actor, phase):
    start = time.monotonic()
    with pytest.raises((ActorFailedError, WeightSyncError)) as err:
        fn()
    assert time.monotonic() - start < 15
    if isinstance(err.value, ActorFailedError):
        assert (err.value.actor, err.value.phase) == (actor, phase), str(err.value)
    assert coord.phase is Phase.FAILED


def _recovered(coord, **kw):
    version = coord.weight_version
    report = coord.recover(**kw)
    assert coord.phase is Phase.ROLLOUT and report.version == version + 1
    assert report.verified_tensors == 2 * len(coord.bucket_plan.metas)
    _check_resident(coord)
    _train(coord)
    coord.sync()


def _trainer_steps(coord) -> set[int]:
    return {s["steps"] for n, s in coord.actor_status().items() if n.startswith("trainer")}


def test_every_recovery_path(default_coordinator, tmp_path):
    coord = default_coordinator
    saved_steps = _trainer_steps(coord)  # {0} when started here, more when passed on
    ckpt = coord.save_trainer(str(tmp_path / "ckpt"))
    saved = coord.trainer_fingerprints()

    coord.inject_fault("engine1", Fault.CRASH_IN_GENERATE)
    _fail(coord, lambda: coord.generate(PROMPTS, SAMPLING), "engine1", "rollout")
    _recovered(coord)  # restart-engines, recover

    coord.inject_fault("engine0", Fault.CRASH_IN_RECEIVE)
    _train(coord)
    _fail(coord, coord.sync, "engine0", "sync")
    _recovered(coord)

    coord.inject_fault("engine1", Fault.CORRUPT_NEXT_BUCKET)
    _train(coord)
    with pytest.raises(WeightSyncError, match="engine1 worker tp0.*arrived corrupted"):
        coord.sync()
    _recovered(coord)  # nothing died: recover only

    coord.inject_fault("trainer1", Fault.CRASH_IN_TRAIN_STEP)
    _fail(coord, lambda: _train(coord), "trainer1", "train")
    with pytest.raises(ColocateError, match=r"trainer rank\(s\) \[1\] died"):
        coord.recover()
    _recovered(coord, checkpoint=ckpt)  # restart-trainers, recover

    _train(coord)
    coord.inject_fault("trainer0", Fault.CRASH_IN_SEND)
    _fail(coord, coord.sync, "trainer0", "sync")
    _recovered(coord, checkpoint=ckpt)

    # An engine and a trainer rank dead at once: both replaced, trainers restored.
    import os
    import signal

    status = coord.actor_status()
    _train(coord)
    os.kill(status["engine1"]["pid"], signal.SIGKILL)
    os.kill(status["trainer0"]["pid"], signal.SIGKILL)
    with pytest.raises(ActorFailedError):
        coord.sync()
    coord.recover(checkpoint=ckpt)
    assert _trainer_steps(coord) == saved_steps  # restored to the checkpoint's step
    assert coord.trainer_fingerprints() == saved
    _train(coord)
    coord.skip_sync()
    timeline = coord.timeline
    _check_order(timeline)
    # every row of the table ran (the two rows that need roles run in the roles' test)
    assert {row.name for row in TABLE} - {"score", "restart-roles"} <= _rows(timeline)


def test_dummy_start_sleeps_at_level_2_and_serves_only_after_the_first_sync(ray_local, model_dir):
    # One shared GPU is enough: the engine on it sleeps in init and generates after the sync.
    spec = TopologySpec(nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1)
    with _coordinator(model_dir, spec=spec, engine={"load_format": LoadFormat.DUMMY}) as coord:
        levels = {s.detail["level"] for s in coord.timeline.spans if s.name == "engine.sleep"}
        assert levels == {2} and coord.weight_version == 1
        assert {c.weight_version for c in coord.generate(PROMPTS, SAMPLING)} == {1}


def test_sync_set_up_takes_three_rounds_whatever_the_number_of_groups(ray_local, model_dir):
    """Simulated CUDA bundles: each of the 4 shared GPUs gets its own CUDA IPC group (the fakes
    carry it over gloo); the set-up still takes 3 driver rounds, as with one group."""
    spec = TopologySpec(nodes=1, gpus_per_node=4, trainer_world_size=4, engines=4)
    with _coordinator(model_dir, spec=spec, probe=fake_cuda_probe()) as coord:
        groups = coord.sync_driver.groups
        assert len(groups) == 4 and {g.backend for g in groups} == {Backend.CUDA_IPC}
        assert coord.sync_driver.setup_rounds == 3
        report = coord.sync()
        assert report.verified_tensors == 4 * len(coord.bucket_plan.metas)
    # (One group, the CPU case, takes the same 3 rounds: test_every_row_of_the_loop_in_order.)


def test_separate_pools_plan_no_memory_moves(ray_local, model_dir):
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=1, engines=1, colocate=False)
    with _coordinator(model_dir, spec=spec) as coord:
        _train(coord)
        coord.sync()
        names = {s.name for s in coord.timeline.spans}
    assert not names & {"engine.sleep", "trainer.offload", "trainer.reload", "engine.wake_kv"}
    assert {"trainer.send_weights", "engine.receive_weights"} <= names


def test_role_rows_in_order_and_a_dead_role_recovered(ray_local, model_dir):
    """Two roles beside the trainer: a judge resident in SCORE, a critic-like one in TRAIN.

    Per GPU, every release (engine sleep, trainer offload, role offload) ends before any
    acquisition of its hand-over starts; every role reports the state the table wants; a
    role's death names it, the phase and the step, and recover() replaces it.
    """
    from fakes import FakeRole, fake_role

    roles = [fake_role("judge", {Phase.SCORE}), fake_role("critic", {Phase.TRAIN})]
    with _coordinator(model_dir, roles=roles) as coord:
        assert coord.phase is Phase.ROLLOUT

        def states() -> dict:
            return {n: s["memory"] for n, s in coord.actor_status().items() if n[0] in "jc"}

        assert set(states().values()) == {"offloaded"}
        for _ in range(2):
            completions = coord.generate(PROMPTS, SAMPLING)
            rounds = coord.rounds
            batch = {"x": list(range(len(completions)))}
            # A verb of another class is refused on the driver: nothing moved, no round ran.
            with pytest.raises(TypeError, match="not a method of the role's class FakeRole"):
                coord.call_role("judge", TrainerTenant.train_step, batch)
            assert coord.phase is Phase.ROLLOUT and coord.rounds == rounds
            assert set(states().values()) == {"offloaded"}
            echoed = coord.call_role("judge", FakeRole.echo, batch)
            assert coord.rounds - rounds == 1  # the score row and the calls: one driver wait
            assert coord.phase is Phase.SCORE
            # rows cut in rank order: the first half on judge0, the rest on judge1
            half = len(completions) // 2
            assert echoed == [(x, 0) for x in range(half)] + [
                (x, 1) for x in range(half, len(completions))
            ]
            assert states() == {
                "judge0": "resident",
                "judge1": "resident",
                "critic0": "offloaded",
                "critic1": "offloaded",
            }
            # a verb declared with takes_max_rows is told the largest shard's rows
            told = coord.call_role("judge", FakeRole.rows_told, {"x": [0, 1, 2, 3, 4]})
            assert told == [(3, 3), (2, 3)]
            coord.train(batch)
            assert states() == {
                "judge0": "offloaded",
                "judge1": "offloaded",
                "critic0": "resident",
                "critic1": "resident",
            }
            assert coord.call_role("critic", FakeRole.where, shard=False) == [
                ("critic0", 0),
                ("critic1", 1),
            ]
            coord.sync()
            assert set(states().values()) == {"offloaded"}
        with pytest.raises(PhaseError, match="role 'critic' is resident in \\['train'\\]"):
            coord.call_role("critic", FakeRole.where, shard=False)

        coord.generate(PROMPTS, SAMPLING)
        coord.inject_fault("judge1", Fault.CRASH_IN_ROLE_CALL)
        t0 = time.time()
        _fail(
            coord, lambda: coord.call_role("judge", FakeRole.echo, {"x": [1, 2]}), "judge1", "score"
        )
        assert time.time() - t0 < 60
        coord.recover()  # restart-roles, recover
        assert coord.phase is Phase.ROLLOUT
        coord.generate(PROMPTS, SAMPLING)
        assert coord.call_role("judge", FakeRole.echo, {"x": [7, 8]}) == [(7, 0), (8, 1)]
        coord.train({"x": [0, 1]})
        coord.sync()
        timeline = coord.timeline
    _check_order(timeline)
    assert {"score", "restart-roles", "recover"} <= _rows(timeline)
    role_spans = {(s.actor, s.name) for s in timeline.spans if s.actor[0] in "jc"}
    for name in ("judge0", "judge1", "critic0", "critic1"):  # a lane per tenant
        assert {(name, "role.reload"), (name, "role.offload")} <= role_spans, name
