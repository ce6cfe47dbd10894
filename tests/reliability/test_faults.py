"""Fault injection on the real stack: an engine or a trainer rank dies in each phase; the
driver gets a typed error naming it within 60 s, nothing is lost, and recover() continues."""

import os
import signal
import time

import psutil
import pytest
import ray

from colocate import ActorFailedError, ColocateError, Phase, Sampling, make_grpo_batch

pytestmark = pytest.mark.timeout(900)
BOUND_S = 60
SAMPLING = Sampling(n=4, max_tokens=8)
PROMPTS = ["kato rimu", "sena lo", "pe vi da", "mu se"]


def _train(coord):
    completions = coord.generate(PROMPTS, SAMPLING)
    rewards = [float(sum(t % 3 == 0 for t in c.token_ids)) for c in completions]
    return coord.train(make_grpo_batch(completions, rewards, SAMPLING.n, pad_id=2))


def _expect_failure(fn, actor, phase):
    start = time.monotonic()
    with pytest.raises(ActorFailedError) as err:
        fn()
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, elapsed
    assert err.value.actor == actor and err.value.phase == phase, str(err.value)
    assert actor in str(err.value) and f"phase {phase!r}" in str(err.value)
    return elapsed


def _recovered(coord, report, name, elapsed, **kw):
    before = coord.weight_version
    sync = coord.recover(**kw)
    assert coord.phase is Phase.ROLLOUT and sync.version == before + 1
    assert sync.verified_tensors == 2 * len(coord.bucket_plan.metas)  # fingerprints equal
    assert {c.weight_version for c in coord.generate(PROMPTS, SAMPLING)} == {sync.version}
    _train(coord)
    coord.sync()  # and the pipeline continues
    report.setdefault("faults", []).append({"fault": name, "error_after_s": round(elapsed, 2)})


def test_engine_dies_during_generate(pipeline, report):
    state = pipeline.trainer_fingerprints()
    pipeline.inject_fault("engine1", "crash_in_generate")
    elapsed = _expect_failure(lambda: pipeline.generate(PROMPTS, SAMPLING), "engine1", "rollout")
    assert pipeline.phase is Phase.FAILED
    assert pipeline.trainer_fingerprints() == state  # the trainer lost nothing
    _recovered(pipeline, report, "engine killed during generate", elapsed)


def test_engine_dies_during_weight_sync(pipeline, report):
    _train(pipeline)
    state = pipeline.trainer_fingerprints()
    version = pipeline.weight_version
    pipeline.inject_fault("engine0", "crash_in_receive")
    elapsed = _expect_failure(pipeline.sync, "engine0", "sync")
    assert pipeline.weight_version == version  # never bumped by a failed sync
    assert pipeline.trainer_fingerprints() == state
    _recovered(pipeline, report, "engine killed during a weight sync", elapsed)


def test_engine_killed_while_asleep(pipeline, report):
    _train(pipeline)  # TRAIN: engines asleep
    assert pipeline.phase is Phase.TRAIN
    state = pipeline.trainer_fingerprints()
    pid = pipeline.actor_status()["engine1"]["pid"]
    os.kill(pid, signal.SIGKILL)
    elapsed = _expect_failure(pipeline.sync, "engine1", "sync")
    assert pipeline.trainer_fingerprints() == state
    _recovered(pipeline, report, "engine killed while asleep", elapsed)


def test_trainer_dies_during_train_step(pipeline, report, tmp_path):
    checkpoint = pipeline.save_trainer(str(tmp_path / "ckpt"))
    saved = pipeline.trainer_fingerprints()
    pipeline.inject_fault("trainer1", "crash_in_train_step")
    elapsed = _expect_failure(lambda: _train(pipeline), "trainer1", "train")
    with pytest.raises(ColocateError, match=r"trainer rank\(s\) \[1\] died.*recover\(checkpoint"):
        pipeline.recover()
    assert pipeline.phase is Phase.FAILED
    before = pipeline.weight_version
    pipeline.recover(checkpoint=checkpoint)
    assert pipeline.trainer_fingerprints() == saved  # restored exactly from the checkpoint
    assert pipeline.weight_version == before + 1
    _train(pipeline)
    pipeline.sync()
    report.setdefault("faults", []).append(
        {"fault": "trainer rank killed during train_step", "error_after_s": round(elapsed, 2)}
    )


def test_trainer_dies_during_weight_sync(pipeline, report, tmp_path):
    _train(pipeline)
    checkpoint = pipeline.save_trainer(str(tmp_path / "ckpt"))
    saved = pipeline.trainer_fingerprints()
    pipeline.inject_fault("trainer0", "crash_in_send")
    elapsed = _expect_failure(pipeline.sync, "trainer0", "sync")
    _recovered(
        pipeline, report, "trainer rank killed during a weight sync", elapsed, checkpoint=checkpoint
    )
    assert saved  # the recovered trainer started from these weights (checked in recover's sync)


def test_shutdown_leaves_nothing_behind(pipeline, report):
    from ray.util.placement_group import placement_group_table

    pids = [s["pid"] for s in pipeline.actor_status().values()]
    ports = [r.port for r in pipeline.sync_driver.rendezvous]
    assert len(pids) == 4 and ports
    pipeline.shutdown()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p)], "actor processes left behind"
    groups = [g for g in placement_group_table().values() if g["name"].startswith(pipeline.name)]
    assert groups and all(g["state"] == "REMOVED" for g in groups)
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    assert not set(ports) & listening, "rendezvous ports still open"
    alive = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(pipeline.name)
    ]
    assert alive == []
    report["shutdown_clean"] = True
