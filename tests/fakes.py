"""A fake fleet of tiny real Ray actors that keep the tenant contract without vLLM or DeepSpeed.

``FakeEngine`` and ``FakeTrainer`` implement ``colocate.core.contract.EngineTenant`` and
``TrainerTenant`` over a few small tensors: the coordinator, the hand-over table, the sync
driver and the real weight_sync machinery (stores, gloo groups, the streaming loops,
fingerprints, verification) all run as they do on the full stack. Each fake checks its own
preconditions (an engine asked to generate asleep raises, a trainer asked to train offloaded
raises), records the same spans as the real actors, and honours the same faults.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import ray
import torch

from colocate.core.contract import (
    Completion,
    EngineCapabilities,
    EngineTenant,
    Receipt,
    Seat,
    TrainerTenant,
)
from colocate.core.errors import ActorStateError, InputError
from colocate.core.faults import Fault, coerce_fault
from colocate.core.phases import EngineMemory, TrainerMemory
from colocate.operations.memory import process_stats
from colocate.roles.base import RoleActor, takes_max_rows

# Ray workers cannot import test modules: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: The fake model: HF-style names (q/k/v and gate/up are fused groups, as in vLLM).
SHAPES = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.self_attn.k_proj.weight": (16, 32),
    "model.layers.0.self_attn.v_proj.weight": (16, 32),
    "model.layers.0.mlp.gate_proj.weight": (48, 32),
    "model.layers.0.mlp.up_proj.weight": (48, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 48),
    "model.norm.weight": (32,),
}
_ORDER = (TrainerMemory.OFFLOADED, TrainerMemory.PARAMS, TrainerMemory.FULL)


def fake_loss(model, batch):
    """The loss the coordinator ships to the fake trainers (which never call it)."""
    raise NotImplementedError


def fake_model_dir(root: Path) -> str:
    """A directory the coordinator's checks accept: a config about the fake model's size
    (head size 32, which the CPU backend check accepts; the fakes never read the config)."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "num_hidden_layers": 1,
        "intermediate_size": 48,
        "vocab_size": 64,
    }
    (root / "config.json").write_text(json.dumps(config))
    (root / "model.safetensors").write_bytes(b"")
    return str(root)


def on_cpu(rdv):
    """The fakes move bytes over gloo whatever the planned transport (CUDA bundles simulated)."""
    from dataclasses import replace

    from weight_sync.transport import Backend

    return replace(rdv, backend=Backend.GLOO)


def _module(shapes: dict) -> torch.nn.Module:
    """Nested modules whose parameters carry exactly the given dotted names."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape)))
    return root


def _metas(dtype: torch.dtype) -> list:
    from weight_sync.buckets import TensorMeta

    return [TensorMeta(n, s, dtype) for n, s in SHAPES.items()]


class FakeEngine(EngineTenant):
    """An engine over a dict of tensors: receives real buckets, 'generates' from its weights."""

    def __init__(self, seat: Seat):
        super().__init__(seat)
        self.memory = EngineMemory.AWAKE
        self.weight_version = 0 if self.config.load_format.value == "auto" else -1
        self.params: dict[str, torch.Tensor] = {}
        self._receiver = None
        self._plan = None
        self._receive_faults: set[Fault] = set()

    def start(self) -> EngineCapabilities:
        if not self.params:
            with self.span("engine.start"):
                self.params = {
                    m.name: torch.zeros(m.shape, dtype=m.dtype) for m in _metas(self._dtype)
                }
            self.memory = EngineMemory.AWAKE
        return EngineCapabilities("FakePlatform", "cpu", False, 1)

    @property
    def _dtype(self) -> torch.dtype:
        return self.config.dtype.torch

    def sleep(self, level: int) -> EngineMemory:
        if self.memory is not EngineMemory.ASLEEP:
            with self.span("engine.sleep", level=level):
                pass
            self.memory = EngineMemory.ASLEEP
        return self.memory

    def wake_weights(self) -> EngineMemory:
        if self.memory is EngineMemory.ASLEEP:
            with self.span("engine.wake_weights"):
                pass
            self.memory = EngineMemory.WEIGHTS
        return self.memory

    def wake_kv(self) -> EngineMemory:
        if self.memory is not EngineMemory.AWAKE:
            with self.span("engine.wake_kv"):
                pass
            self.memory = EngineMemory.AWAKE
        return self.memory

    def generate(self, prompts: list, sampling, first_index: int = 0) -> list[Completion]:
        if self.memory is not EngineMemory.AWAKE:
            raise ActorStateError(
                f"{self.name}: generate needs the engine awake, it is {self.memory}"
            )
        if self.weight_version < 0:
            raise ActorStateError(f"{self.name}: dummy weights not synced yet")
        self._maybe_crash(Fault.CRASH_IN_GENERATE)
        from weight_sync.fingerprint import fingerprint

        seed = fingerprint(self.params["model.embed_tokens.weight"]).bit_sum
        out = []
        with self.span("engine.generate", prompts=len(prompts)):
            for p in range(len(prompts)):
                for s in range(sampling.n):
                    ids = tuple(
                        (seed + 7 * p + 3 * s + i) % 61 + 3 for i in range(sampling.max_tokens)
                    )
                    out.append(
                        Completion(
                            first_index + p,
                            s,
                            (1, 2),
                            ids,
                            (-1.0,) * len(ids),
                            "",
                            "length",
                            self.weight_version,
                        )
                    )
        return out

    def rollout(self, requests, sampling, groups: int, finish: frozenset) -> list:
        """Finishes every request at once: a few tokens each, tagged with this version."""
        import dataclasses

        if self.memory is not EngineMemory.AWAKE:
            raise ActorStateError(f"{self.name}: rollout needs the engine awake")
        self._maybe_crash(Fault.CRASH_IN_GENERATE)
        out = []
        with self.span("engine.rollout", requests=len(requests), groups=groups):
            for r in requests:
                if r.done:
                    out.append(r)
                    continue
                n = min(3, sampling.max_tokens - len(r.token_ids))
                out.append(
                    dataclasses.replace(
                        r,
                        prompt_token_ids=r.prompt_token_ids or (1, 2),
                        token_ids=(*r.token_ids, *([5] * n)),
                        logprobs=(*r.logprobs, *([-1.0] * n)),
                        spans=(*r.spans, (self.weight_version, n)),
                        finish_reason="length",
                    )
                )
        return out

    def expected_weights(self):
        from weight_sync.packing import LLAMA_PACKING, EngineWeights

        metas = tuple(_metas(self._dtype))
        params = tuple(sorted({LLAMA_PACKING.engine_name(m.name) for m in metas}))
        return EngineWeights(metas, LLAMA_PACKING, params)

    def setup_sync(self, setup) -> list[dict]:
        from weight_sync.factory import make_receiver

        if self._receiver is not None:
            self._receiver.close()
        self._plan = setup.plan
        self._receiver = make_receiver(
            on_cpu(setup.rendezvous[0]),
            setup.group_ranks[0],
            setup.plan.max_bucket_bytes,
            torch.device("cpu"),
        )
        return [{"tp_rank": 0, "group_rank": setup.group_ranks[0]}]

    def receive_weights(self, request) -> Receipt:
        from weight_sync.fingerprint import compare, fingerprint
        from weight_sync.receiver import ReceiveReport
        from weight_sync.stream import manifest_key, receive_stream
        from weight_sync.verify import check_applied

        if self.memory is EngineMemory.ASLEEP:
            raise ActorStateError(f"{self.name}: weights are asleep; wake_weights before a sync")
        report = ReceiveReport(version=request.version, tp_rank=0)
        faults, self._receive_faults = self._receive_faults, set()

        def apply(bucket, buffer) -> None:
            if Fault.CORRUPT_NEXT_BUCKET in faults and bucket.index == 0:
                buffer[: bucket.nbytes : 97].add_(1)
            for name, view in bucket.views(buffer):
                if request.verify:
                    report.fingerprints[name] = fingerprint(view)
                self.params[name].copy_(view)
            if Fault.CRASH_IN_RECEIVE in faults:
                os._exit(1)

        with self.span("engine.receive_weights", version=request.version):
            stats = receive_stream(self._plan.buckets, self._receiver, apply)
        report.bytes_received, report.seconds = stats.bytes, stats.seconds
        receipt = Receipt(request.version, [report])
        if request.verify:
            # As vLLM does, fused groups are one applied parameter: its fingerprint is the sum.
            for name, tensor in self.params.items():
                key = self._plan.packing.engine_name(name)
                fp = fingerprint(tensor)
                report.applied[key] = report.applied[key] + fp if key in report.applied else fp
            # The sender's manifest came through the transport, as for the real receiver.
            key = manifest_key(request.version, request.sequence)
            sent = pickle.loads(self._receiver.fetch(key))
            where = f"{self.name} worker tp0 (version {request.version})"
            compare(sent, report.fingerprints, where=where)
            packing = self._plan.packing
            applied = check_applied(sent, [report.applied], packing, where=self.name)
            receipt = Receipt(request.version, [report], len(report.fingerprints), applied)
        self.weight_version = request.version
        return receipt

    def status(self) -> dict:
        return {
            "name": self.name,
            "memory": self.memory.value,
            "weight_version": self.weight_version,
            **process_stats(),
        }

    def inject_fault(self, fault) -> None:
        fault = coerce_fault(fault)
        if fault is Fault.CRASH_IN_GENERATE:
            self._faults.add(fault)
        else:
            self._receive_faults.add(fault)

    def shutdown(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None


class FakeTrainer(TrainerTenant):
    """A 'data-parallel' trainer over a few tensors: every rank takes the same step."""

    def __init__(self, seat: Seat):
        super().__init__(seat)
        self.rank = seat.rank
        self.memory = TrainerMemory.FULL
        self.module: torch.nn.Module | None = None
        self.steps = 0
        self._stores: dict = {}
        self._sender = None
        self._prepared = False

    def host_group_store(self, multi_node: bool, timeout_s: float) -> tuple[str, int]:
        return ("127.0.0.1", 1)  # the fake ranks need no group of their own

    def prepare(self, master, timeout_s: float) -> dict:
        if not self._prepared:
            with self.span("trainer.prepare"):
                pass
            self._prepared = True
        return {}

    def start(self, master, timeout_s: float) -> dict:
        if self.module is None:
            with self.span("trainer.start"):
                torch.manual_seed(self.config.seed)
                self.module = _module(SHAPES)
            self.memory = TrainerMemory.FULL
        return {"rank": self.rank, "parameters": sum(p.numel() for p in self.module.parameters())}

    def _source(self):
        from weight_sync.sources import ModuleSource

        return ModuleSource(self.module)

    def train_step(self, shard: dict, max_rows: int | None = None) -> dict[str, float]:
        if self.memory is not TrainerMemory.FULL:
            raise ActorStateError(f"{self.name}: train_step needs memory full, it is {self.memory}")
        with self.span("trainer.train_step", rows=len(next(iter(shard.values())))):
            self._maybe_crash(Fault.CRASH_IN_TRAIN_STEP)
            with torch.no_grad():
                for p in self.module.parameters():
                    p.mul_(0.99).add_(0.01)
        self.steps += 1
        return {"loss": 1.0 / self.steps}

    def offload(self, keep_params: bool) -> TrainerMemory:
        target = TrainerMemory.PARAMS if keep_params else TrainerMemory.OFFLOADED
        if _ORDER.index(self.memory) > _ORDER.index(target):
            with self.span("trainer.offload" if keep_params else "trainer.offload_params"):
                pass
            self.memory = target
        return self.memory

    def reload(self) -> TrainerMemory:
        if self.memory is not TrainerMemory.FULL:
            with self.span("trainer.reload"):
                pass
            self.memory = TrainerMemory.FULL
        return self.memory

    def node_address(self, multi_node: bool) -> str:
        return "127.0.0.1"

    def weight_metas(self, dtype) -> list:
        return self._source().metas(dtype)

    def host_sync_store(self, host: str, world_size: int, key: str, timeout_s: float) -> int:
        from weight_sync.store import host_store

        store, port, sock = host_store(host, world_size, timeout_s, key)
        self._stores[key] = (store, sock)
        return port

    def setup_sync(self, plan, rendezvous: list) -> bool:
        from weight_sync.factory import make_sender
        from weight_sync.sender import WeightSender

        if self._sender is not None:
            self._sender.close()
        sender = WeightSender(self._source(), plan, torch.device("cpu"))
        buffers = sender.allocate_buffers() if rendezvous else ()
        for rdv in rendezvous:
            sender.transports.append(
                make_sender(on_cpu(rdv), self._stores[rdv.key][0], buffers, torch.device("cpu"))
            )
        self._sender = sender
        return True

    def send_weights(self, request):
        if self.memory is TrainerMemory.OFFLOADED:
            raise ActorStateError(f"{self.name}: params are offloaded; reload before a sync")
        with self.span("trainer.send_weights", version=request.version):
            return self._sender.send(
                request.version,
                verify=request.verify,
                sequence=request.sequence,
                after_bucket=lambda _: self._maybe_crash(Fault.CRASH_IN_SEND),
            )

    def close_sync_stores(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        for _, sock in self._stores.values():
            sock.close()
        self._stores = {}

    def param_fingerprints(self, chunk_bytes: int = 256 << 20) -> dict:
        from weight_sync.fingerprint import fingerprint

        return {n: fingerprint(p) for n, p in self.module.named_parameters()}

    def save(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        torch.save(
            {"state": self.module.state_dict(), "steps": self.steps}, f"{path}/rank{self.rank}.pt"
        )
        return path

    def load(self, path: str) -> int:
        saved = torch.load(f"{path}/rank{self.rank}.pt")
        self.module.load_state_dict(saved["state"])
        self.steps = saved["steps"]
        return self.steps

    def export_hf(self, path: str, dtype: str, chunk_bytes: int = 256 << 20) -> str | None:
        return self.save(path)

    def status(self) -> dict:
        return {
            "name": self.name,
            "memory": self.memory.value,
            "steps": self.steps,
            **process_stats(),
        }

    def inject_fault(self, fault) -> None:
        self._faults.add(coerce_fault(fault))

    def shutdown(self) -> None:
        self.close_sync_stores()


class RefusingTrainer(FakeTrainer):
    """Refuses a shard with a ``refuse`` column (``InputError``), after its hand-over ran."""

    def train_step(self, shard: dict, max_rows: int | None = None) -> dict[str, float]:
        if "refuse" in shard:
            raise InputError(f"{self.name}: refused the shard (it has a 'refuse' column)")
        return super().train_step(shard, max_rows)


def fake_coordinator(model_dir: str, spec=None, *, engine=None, trainer_cls=None, **kw):
    """The real ``Coordinator`` over this fake fleet (no vLLM, no DeepSpeed), short bounds.

    Args:
        model_dir: A :func:`fake_model_dir`.
        spec: The topology (default: 2 GPUs, 2 trainer ranks, 2 engines, colocated).
        engine: Extra ``EngineConfig`` fields.
        trainer_cls: The trainer actor class (default :class:`FakeTrainer`).
        **kw: Other ``Coordinator`` arguments (``pipeline``, ``probe``, ...).
    """
    from colocate import Coordinator, EngineConfig, SyncConfig, TrainerConfig
    from colocate.core.coordinator import Timeouts
    from placement import TopologySpec

    return Coordinator(
        spec or TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=2, engines=2),
        EngineConfig(model=model_dir, **(engine or {})),
        TrainerConfig(model=model_dir),
        fake_loss,
        sync=SyncConfig(bucket_bytes=4 << 10, timeout_s=3),
        timeouts=Timeouts(start_s=60, step_s=30, ping_s=5),
        engine_cls=FakeEngine,
        trainer_cls=trainer_cls or FakeTrainer,
        **kw,
    )


class FakeRole(RoleActor):
    """A role over one small real module: ``echo`` returns each row's ``x`` plus its rank.

    The base class's memory mechanisms, spans and faults run as they do for the built-in roles.
    """

    def build(self):
        return torch.nn.Linear(4, 4)

    def echo(self, batch: dict) -> list:
        self.require_resident("echo")
        with self.span("fake_role.echo"):
            return [(x, self.rank) for x in batch["x"]]

    def where(self) -> tuple[str, int]:
        return self.name, self.lane

    @takes_max_rows
    def rows_told(self, batch: dict, max_rows: int | None = None) -> list:
        """This rank's rows and the largest shard's it was told (one entry per rank)."""
        self.require_resident("rows_told")
        return [(len(batch["x"]), max_rows)]


def fake_role(name: str, phases, bundles=None):
    """A :class:`FakeRole` role named ``name``, resident in ``phases``."""
    from colocate.roles.base import Role

    return Role(name, FakeRole, None, frozenset(phases), bundles)
