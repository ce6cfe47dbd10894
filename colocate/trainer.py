"""The trainer actor: one rank of a DeepSpeed engine (or the plain-torch fallback).

Every method is an idempotent mechanism; the coordinator decides when each runs and calls
collectives (start, train_step, send_weights under ZeRO-3, save/load) on every rank at once.
"""

from __future__ import annotations

import datetime
import gc
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from colocate.config import TrainerConfig, ZeroStage
from colocate.phases import TrainerMemory
from colocate.timeline import Recorder, Span

__all__ = ["TrainerActor", "LossFn", "shard_batch"]

#: ``loss_fn(model, batch) -> (loss, metrics)``: ``model`` is callable like the HF model (the
#: DeepSpeed engine forwards to it), ``batch`` is this rank's shard, ``metrics`` plain floats.
LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]]

# DeepSpeed state groups kept on the device while weights are sent (TRAIN -> SYNC).
_KEEP_FOR_SYNC = "lp_params"


def shard_batch(batch: dict, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s contiguous share of the rows of every tensor or list in ``batch``.

    Rows are split as evenly as possible (the first ``rows % world_size`` ranks get one more);
    other values are passed through.
    """
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))}
    if len(sizes) != 1:
        raise ValueError(f"batch fields have different lengths {sorted(sizes)}; pass equal rows")
    (rows,) = sizes
    if rows < world_size:
        raise ValueError(
            f"batch has {rows} rows for {world_size} trainer ranks; pass at least one row a rank"
        )
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return {
        k: v[start:stop] if isinstance(v, (torch.Tensor, list, tuple)) else v
        for k, v in batch.items()
    }


class TrainerActor:
    """One trainer rank.

    Args:
        config: The trainer configuration (shared by all ranks).
        rank: This rank.
        world_size: Trainer ranks.
        name: Actor name for errors and the timeline (e.g. ``"trainer0"``).
        lane: Bundle index (GPU) of this rank.
        loss_fn: The user's loss (a module-level function, so Ray can ship it).
        env: Environment set before DeepSpeed is imported (passed by the coordinator).
    """

    def __init__(
        self,
        config: TrainerConfig,
        rank: int,
        world_size: int,
        name: str,
        lane: int,
        loss_fn: LossFn,
        env: dict[str, str],
    ):
        os.environ.update(env)
        # DeepSpeed calls torch.distributed APIs that torch has deprecated: one FutureWarning
        # per call, per step, per rank. They say nothing about this run.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.name = name
        self.recorder = Recorder(name, (lane,))
        self.loss_fn = loss_fn
        self.memory = TrainerMemory.FULL
        self.engine = None  # the DeepSpeed engine, or the plain module
        self.optimizer = None
        self.steps = 0
        self._sender = None
        self._group_store: tuple | None = None
        self._stores: dict[str, tuple] = {}  # rendezvous key -> (store, listening socket)
        self._faults: set[str] = set()

    # ----- start-up ---------------------------------------------------------------------------

    def node_address(self, multi_node: bool) -> str:
        """The address this rank's listeners bind to: loopback unless peers are on other nodes."""
        if not multi_node:
            return "127.0.0.1"
        import ray

        return ray.util.get_node_ip_address()

    def host_group_store(self, multi_node: bool, timeout_s: float) -> tuple[str, int]:
        """Starts the trainer group's store on rank 0, bound to one address; returns it.

        torch's own env:// rendezvous would listen on every interface; this one listens on
        :meth:`node_address` only (loopback on a single node).
        """
        from weight_sync.store import host_store

        host = self.node_address(multi_node)
        store, port, sock = host_store(host, self.world_size, timeout_s, key="trainer-group")
        self._group_store = (store, sock)
        return host, port

    def start(
        self, master: tuple[str, int], timeout_s: float, tag: tuple[str, int], *after
    ) -> dict:
        """Joins the trainer group and builds the model and optimizer (all ranks at once).

        ``after``: results of the releases this acquisition waited for (ignored).
        """
        if self.engine is not None:
            return self.describe()
        with self.recorder.span("trainer.start", tag):
            torch.manual_seed(self.config.seed)
            if self.config.deepspeed:
                self._start_deepspeed(master, timeout_s)
            else:
                self._start_torch()
            # DeepSpeed's offload_states ends in gc.collect(), which walks every object the
            # imports and the model created (~0.3 s each time on the build machine): move them
            # out of the collector's way once they exist.
            gc.freeze()
        self.memory = TrainerMemory.FULL
        return self.describe()

    def _device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _load_model(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.config.model, dtype=torch.float32)

    def _start_deepspeed(self, master: tuple[str, int], timeout_s: float) -> None:
        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(0),
        )
        import deepspeed
        import torch.distributed as dist

        from weight_sync.store import join_store

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if self.rank == 0:
            store = self._group_store[0]
        else:
            store = join_store(master[0], master[1], self.world_size, timeout_s, "trainer-group")
        # Our store (bound to one address) and our timeout, which bounds every trainer
        # collective (DeepSpeed's default: 10 min); DeepSpeed then adopts this default group.
        dist.init_process_group(
            backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout
        )
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        cfg = self.config
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "optimizer": {
                # DeepSpeed's own AdamW (FusedAdam, with a CPU build): ZeRO-3 offload_states
                # refuses a torch optimizer.
                "type": "AdamW",
                "params": {
                    "lr": cfg.lr,
                    "betas": list(cfg.betas),
                    "weight_decay": cfg.weight_decay,
                },
            },
            "zero_optimization": {"stage": int(cfg.zero_stage)},
            "bf16": {"enabled": cfg.dtype.value == "bfloat16"},
            "fp16": {"enabled": cfg.dtype.value == "float16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if cfg.zero_stage is ZeroStage.ZERO3:
            # Partition every parameter (small ones are otherwise kept whole on every rank).
            ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        _merge(ds_config, cfg.ds_config)
        model = self._load_model()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config
        )

    def _start_torch(self) -> None:
        if self.world_size != 1:
            raise ValueError(
                f"TrainerConfig.deepspeed=False supports one trainer rank, got world size "
                f"{self.world_size}; fix: use deepspeed=True or trainer_world_size=1"
            )
        model = self._load_model().to(self._device())
        cfg = self.config
        self.engine = model
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )

    def describe(self) -> dict:
        """Rank, backend, ZeRO stage, optimizer class and parameter count."""
        module = self._module()
        return {
            "rank": self.rank,
            "deepspeed": self.config.deepspeed,
            "zero_stage": int(self.config.zero_stage) if self.config.deepspeed else None,
            "optimizer": type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__,
            "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
        }

    def _module(self) -> torch.nn.Module:
        return self.engine.module if self.config.deepspeed else self.engine

    # ----- training ---------------------------------------------------------------------------

    def train_step(self, shard: dict, tag: tuple[str, int]) -> dict[str, float]:
        """One optimizer step on this rank's shard of the batch (all ranks at once).

        The coordinator cuts the batch with :func:`shard_batch`, so each rank receives only
        its own rows.
        """
        self._require(TrainerMemory.FULL, "train_step")
        with self.recorder.span("trainer.train_step", tag, rows=len(next(iter(shard.values())))):
            if self.config.deepspeed:
                loss, metrics = self.loss_fn(self.engine, shard)
                self._maybe_crash("crash_in_train_step")
                self.engine.backward(loss)
                self.engine.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss, metrics = self.loss_fn(self.engine, shard)
                loss.backward()
                if self.config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.engine.parameters(), self.config.grad_clip)
                self.optimizer.step()
        self.steps += 1
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}

    # ----- memory -----------------------------------------------------------------------------

    def offload(self, keep_params: bool, tag: tuple[str, int]) -> TrainerMemory:
        """Moves training state to host memory; with ``keep_params`` the params stay resident.

        ``keep_params=True`` is the TRAIN -> SYNC release (grads and optimizer states go; the
        params are about to be sent); ``False`` offloads everything (SYNC -> ROLLOUT).
        """
        target = TrainerMemory.PARAMS if keep_params else TrainerMemory.OFFLOADED
        order = [TrainerMemory.OFFLOADED, TrainerMemory.PARAMS, TrainerMemory.FULL]
        if order.index(self.memory) <= order.index(target):
            return self.memory
        name = "trainer.offload" if keep_params else "trainer.offload_params"
        with self.recorder.span(name, tag):
            if self._uses_ds_offload():
                from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

                include = [
                    s
                    for s in OffloadStateTypeEnum
                    if not (keep_params and s.value == _KEEP_FOR_SYNC)
                ]
                self.engine.offload_states(include=include)
            else:
                self._torch_offload(keep_params)
        self.memory = target
        return self.memory

    def reload(self, tag: tuple[str, int], *after) -> TrainerMemory:
        """Brings every offloaded state back to the device.

        ``after``: results of the releases this acquisition waited for (ignored).
        """
        if self.memory is not TrainerMemory.FULL:
            with self.recorder.span("trainer.reload", tag):
                if self._uses_ds_offload():
                    self.engine.reload_states()
                else:
                    self._torch_reload()
            self.memory = TrainerMemory.FULL
        return self.memory

    def _uses_ds_offload(self) -> bool:
        return self.config.deepspeed and self.config.zero_stage is not ZeroStage.ZERO0

    def _torch_offload(self, keep_params: bool) -> None:
        # Plain-torch fallback: move tensors to (pinned, on CUDA) host memory.
        device = self._device()
        if device.type != "cuda":
            return  # already on the host: nothing to release
        module = self._module()
        for p in module.parameters():
            if p.grad is not None:
                p.grad = None  # grads are recomputed every step: drop rather than copy
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.is_cuda:
                    state[k] = v.to("cpu", non_blocking=True).pin_memory()
        if not keep_params:
            for p in module.parameters():
                p.data = p.data.to("cpu").pin_memory()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def _torch_reload(self) -> None:
        device = self._device()
        if device.type != "cuda":
            return
        for p in self._module().parameters():
            p.data = p.data.to(device, non_blocking=True)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(device, non_blocking=True)
        torch.cuda.synchronize()

    # ----- weight sync ------------------------------------------------------------------------

    def weight_metas(self, dtype: torch.dtype) -> list:
        """Names, full shapes and the engine dtype of every weight to send."""
        from weight_sync.sources import source_for

        return source_for(self.engine).metas(dtype)

    def host_sync_store(self, host: str, world_size: int, key: str, timeout_s: float) -> int:
        """Starts the transfer group's store on this rank; returns its port."""
        from weight_sync.store import host_store

        store, port, sock = host_store(host, world_size, timeout_s, key)
        self._stores[key] = (store, sock)
        return port

    def setup_sync(self, plan, rendezvous: list) -> bool:
        """Builds this rank's sender over the given rendezvous (concurrently with receivers).

        A rank with no rendezvous still takes part in ZeRO-3 gathers during every sync.
        """
        from weight_sync.sender import WeightSender
        from weight_sync.sources import source_for
        from weight_sync.transport import make_sender

        self.teardown_sync()
        sender = WeightSender(source_for(self.engine), plan, self._device())
        buffers = sender.allocate_buffers() if rendezvous else ()
        for rdv in rendezvous:
            store, _ = self._stores[rdv.key]
            sender.transports.append(make_sender(rdv, store, buffers, self._device()))
        self._sender = sender
        return True

    def send_weights(self, request, tag: tuple[str, int]):
        """Streams every bucket (see ``weight_sync.sender``); returns this rank's report."""
        if self._sender is None:
            raise RuntimeError(f"{self.name}: weight sync is not set up")
        if self.memory is TrainerMemory.OFFLOADED:
            raise RuntimeError(f"{self.name}: params are offloaded; reload before a sync")
        with self.recorder.span("trainer.send_weights", tag, version=request.version):
            return self._sender.send(
                request.version,
                verify=request.verify,
                after_bucket=lambda _: self._maybe_crash("crash_in_send"),
            )

    def teardown_sync(self) -> None:
        """Closes the sender (the stores stay for a re-setup). Idempotent."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def close_sync_stores(self) -> None:
        """Closes the stores this rank hosts (after :meth:`teardown_sync`)."""
        self.teardown_sync()
        for _, sock in self._stores.values():
            sock.close()
        self._stores = {}

    # ----- state ------------------------------------------------------------------------------

    def param_fingerprints(self) -> dict:
        """Fingerprints of every full parameter, as stored (all ranks at once under ZeRO-3)."""
        from weight_sync.fingerprint import fingerprint
        from weight_sync.sources import source_for

        source = source_for(self.engine)
        names = [m.name for m in source.metas(torch.float32)]
        out = {}
        with source.gathered(names) as tensors:
            for n in names:
                out[n] = fingerprint(tensors[n])
        return out

    def save(self, path: str) -> str:
        """Saves a checkpoint (model, optimizer, step) under ``path`` (all ranks at once)."""
        if self.config.deepspeed:
            # DeepSpeed also writes a file named "latest" naming the newest tag.
            tag = f"step{self.steps}"
            self.engine.save_checkpoint(path, tag=tag, client_state={"steps": self.steps})
        else:
            os.makedirs(path, exist_ok=True)
            torch.save(
                {
                    "model": self.engine.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "steps": self.steps,
                },
                os.path.join(path, "trainer.pt"),
            )
        return path

    def load(self, path: str) -> int:
        """Loads a checkpoint saved by :meth:`save`; returns the restored step count."""
        if self.config.deepspeed:
            _, client = self.engine.load_checkpoint(path)  # the tag in <path>/latest
            self.steps = int((client or {}).get("steps", 0))
        else:
            state = torch.load(os.path.join(path, "trainer.pt"), map_location=self._device())
            self.engine.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.steps = int(state["steps"])
        return self.steps

    def export_hf(self, path: str, dtype: str = "bfloat16") -> str | None:
        """Writes the current weights as an HF model directory (rank 0 writes; all ranks call)."""
        from weight_sync.sources import source_for

        source = source_for(self.engine)
        names = [m.name for m in source.metas(torch.float32)]
        with source.gathered(names) as tensors:
            state = {
                n: t.detach().to("cpu", getattr(torch, dtype)).clone() for n, t in tensors.items()
            }
        if self.rank != 0:
            return None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self._module().config)
        model.load_state_dict(state, assign=True, strict=False)
        model.tie_weights()
        model.save_pretrained(path, state_dict=dict(state))
        AutoTokenizer.from_pretrained(self.config.model).save_pretrained(path)
        return path

    def drain_spans(self) -> list[Span]:
        """Timeline spans recorded since the last drain."""
        return self.recorder.drain()

    def status(self) -> dict:
        """Memory state, steps, pid, RSS, open fds and threads (health and soak)."""
        from colocate.memory import process_stats

        return {
            "name": self.name,
            "memory": self.memory.value,
            "steps": self.steps,
            **process_stats(),
        }

    def inject_fault(self, fault: str) -> None:
        """Arms a fault (test hook).

        ``crash_in_train_step`` (after the forward) or ``crash_in_send`` (after the first
        bucket): the process exits there, as a kill would.
        """
        known = ("crash_in_train_step", "crash_in_send")
        if fault not in known:
            raise ValueError(f"unknown fault {fault!r}; known: {known}")
        self._faults.add(fault)

    def _maybe_crash(self, point: str) -> None:
        if point in self._faults:
            os._exit(1)

    def shutdown(self) -> None:
        """Closes the sync, the trainer group and the group's store."""
        self.close_sync_stores()
        if self._group_store is not None:
            self._group_store[1].close()
            self._group_store = None
        if self.config.deepspeed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        self.engine = None
        self.optimizer = None

    def _require(self, memory: TrainerMemory, action: str) -> None:
        if self.engine is None:
            raise RuntimeError(f"{self.name}: {action} before start")
        if self.memory is not memory:
            raise RuntimeError(
                f"{self.name}: {action} needs memory state {memory.value}, "
                f"it is {self.memory.value}"
            )


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
