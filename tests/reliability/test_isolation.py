"""Two pipelines at once on one Ray cluster never cross; nothing of ours listens beyond loopback."""

import threading
from pathlib import Path

import psutil
import pytest
import ray

from colocate import Coordinator, EngineConfig, Sampling, TrainerConfig, grpo_loss, make_grpo_batch
from placement import TopologySpec
from weight_sync.errors import VerificationError
from weight_sync.fingerprint import fingerprint
from weight_sync.verify import check_applied

pytestmark = pytest.mark.timeout(900)
SAMPLING = Sampling(n=2, max_tokens=8)


def _listeners(pid):
    return [c.laddr for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"]


def _exported_fingerprints(coord, path: Path) -> dict:
    """Fingerprints of the trainer's weights as the engines hold them: exported in the engine
    dtype (the cast the sync applies), by checkpoint name."""
    from safetensors.torch import load_file

    coord.export_hf(str(path))
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update((name, fingerprint(t)) for name, t in load_file(str(shard)).items())
    return out


def _engine_applied(coord) -> list[dict]:
    """Per TP worker, fingerprints of the parameters engine0 holds, computed by the engine."""
    engine = coord.fleet.handle(coord.fleet.by_name("engine0"))
    return ray.get(engine.applied_fingerprints.remote(), timeout=120)


def test_two_pipelines_at_once_do_not_disturb_each_other(
    ray_local, tiny_model_dir, report, tmp_path
):
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
                coord.sync_driver.rendezvous,
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
        assert fp0 != fp1  # different learning rates (and seeds): the trainers diverged
        # Neither engine received the other run's weights: each engine's own fingerprints of
        # what it holds match its run's trainer and differ from the other run's.
        sent = [_exported_fingerprints(p, tmp_path / f"export{i}") for i, p in enumerate(pipes)]
        for i, p in enumerate(pipes):
            applied, packing = _engine_applied(p), p.bucket_plan.packing
            assert check_applied(sent[i], applied, packing, where=f"iso{i} engine0") > 0
            with pytest.raises(VerificationError, match="differs from what was sent"):
                check_applied(sent[1 - i], applied, packing, where=f"iso{i} engine0")
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
