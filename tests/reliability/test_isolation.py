"""Two pipelines at once on one Ray cluster never cross; nothing of ours listens beyond loopback."""

import threading

import psutil
import pytest

from colocate import Coordinator, EngineConfig, Sampling, TrainerConfig, grpo_loss, make_grpo_batch
from placement import TopologySpec

pytestmark = pytest.mark.timeout(900)
SAMPLING = Sampling(n=2, max_tokens=8)


def _listeners(pid):
    return [c.laddr for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"]


def test_two_pipelines_at_once_do_not_disturb_each_other(ray_local, tiny_model_dir, report):
    spec = TopologySpec(nodes=1, gpus_per_node=1, trainer_world_size=1, engines=1)
    pipes = [
        Coordinator(
            spec,
            EngineConfig(model=tiny_model_dir, seed=i),
            TrainerConfig(model=tiny_model_dir, lr=(1e-3, 5e-3)[i], zero_stage=2),
            grpo_loss,
            name=f"iso{i}",
        )
        for i in range(2)
    ]
    results, errors = {}, []

    def run(i, coord):
        try:
            coord.start()
            versions = []
            for _ in range(3):
                completions = coord.generate(["kato rimu", "sena lo"], SAMPLING)
                rewards = [float(c.token_ids[0] % 2) for c in completions]
                coord.train(make_grpo_batch(completions, rewards, SAMPLING.n, pad_id=2))
                sync = coord.sync()
                assert sync.verified_tensors == len(coord.bucket_plan.metas)
                versions.append(sync.version)
            results[i] = (
                versions,
                coord.trainer_fingerprints(),
                coord._sync.rendezvous,
                coord.actor_status(),
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(pipes)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=800)
        assert not errors, errors
        (v0, fp0, rdv0, st0), (v1, fp1, rdv1, st1) = results[0], results[1]
        assert v0 == v1 == [2, 3, 4]  # each pipeline counts its own versions
        assert fp0 != fp1  # different learning rates: neither received the other's weights
        assert {r.key for r in rdv0}.isdisjoint({r.key for r in rdv1})
        assert {r.port for r in rdv0}.isdisjoint({r.port for r in rdv1})
        # Our rendezvous stores listen on loopback only.
        for rdvs, status in ((rdv0, st0), (rdv1, st1)):
            trainer_pid = status["trainer0"]["pid"]
            ports = {r.port for r in rdvs}
            bound = [a for a in _listeners(trainer_pid) if a.port in ports]
            assert bound and all(a.ip == "127.0.0.1" for a in bound), bound
        report["isolation"] = {"pipelines": 2, "syncs_each": 3, "stores_bind": "127.0.0.1"}
    finally:
        for p in pipes:
            p.shutdown()
