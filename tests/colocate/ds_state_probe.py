"""What a DeepSpeed ZeRO engine holds between steps and in one, tensor by tensor (CPU).

Run as a script (one fresh process per call, so that DeepSpeed's CPU accelerator, its process
group and its allocations stay out of the caller)::

    python tests/colocate/ds_state_probe.py \
        '{"spec": {...}, "zero_stage": 3, "dtype": "bfloat16", "env": {"DS_ACCELERATOR": "cpu"}}'

It builds the tiny Llama of ``spec`` (``colocate.build_tiny_model``), starts one trainer rank
through the project's own backend (``colocate.actors.deepspeed_backend.DeepSpeedBackend.start``: the
config the trainer actor uses, the partitioned ZeRO-3 load, DeepSpeed's fused AdamW) at world
size 1 on gloo, runs a warm-up step of ``lm_loss`` through ``DeepSpeedBackend.step`` (FusedAdam
creates its states in it), then a second step as that method makes it, split in two measured
windows (forward + backward, then ``engine.step()``). It prints one JSON line: bytes per
category of what the optimizer and engine hold after the step and at the entry of the torch
optimizer's ``step`` (a ``register_step_pre_hook``); every live torch tensor of the process
(``gc``) between steps; and the peak of each window (torch's profiler with
``profile_memory``: the running sum of the CPU allocator's allocations and frees). Torch
tensor accounting throughout, not RSS, each storage counted once.

Categories, by where DeepSpeed keeps each tensor (the first that claims a storage owns it):
the low-precision partitions (``fp16_partitioned_groups_flat``, or ZeRO 1-2's
``bit16_groups_flat``), the fp32 master partitions (``fp32_partitioned_groups_flat`` /
``single_partition_of_fp32_groups``) and their ``.grad``, the optimizer's states
(``exp_avg``, ``exp_avg_sq``, ...), the gradient partitions (ZeRO-3's
``grad_partitions_flat_buffer``), the reduce (IPG) buckets, the model's own parameters and
gradients, then anything else the optimizer or engine object reaches (named by its
attribute). The all-live-tensors total is the cross-check that nothing was missed.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import socket
import sys
import time
from collections import defaultdict

__all__ = ["measure"]


def _key(t) -> tuple[int, str] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # meta or sparse tensors hold no storage
        return None
    if storage.nbytes() == 0 or t.device.type == "meta":
        return None
    return storage.data_ptr(), str(t.device)


class _Ledger:
    """Bytes per category, each storage counted once (under the first category that claims it)."""

    def __init__(self) -> None:
        self.owner: dict[tuple[int, str], str] = {}
        self.bytes: dict[str, int] = defaultdict(int)

    def claim(self, category: str, tensor) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor):
            return
        key = _key(tensor)
        if key is None or key in self.owner:
            return
        self.owner[key] = category
        self.bytes[category] += tensor.untyped_storage().nbytes()


def _walk(obj, path: str, ledger: _Ledger, seen: set[int], depth: int) -> None:
    """Claims every tensor reachable from ``obj`` (and its ``.grad``), named by ``path``."""
    import torch

    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        ledger.claim(f"other: {path}", obj)
        if obj.grad is not None:
            ledger.claim(f"other: {path}.grad", obj.grad)
        for attr in ("ds_tensor",):  # ZeRO-3 keeps a parameter's partition beside it
            if isinstance(getattr(obj, attr, None), torch.Tensor):
                ledger.claim(f"other: {path}.{attr}", getattr(obj, attr))
        return
    if isinstance(obj, (str, bytes, int, float, bool, type(None), type)):
        return
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            _walk(k, path, ledger, seen, depth + 1)
            _walk(v, path, ledger, seen, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        for v in list(obj):
            _walk(v, path, ledger, seen, depth + 1)
        return
    fields = getattr(obj, "__dict__", None)
    if isinstance(fields, dict):
        for name, v in list(fields.items()):
            _walk(v, f"{path}.{name}" if depth < 2 else path, ledger, seen, depth + 1)


def _named(ledger: _Ledger, optimizer, module) -> None:
    """Claims DeepSpeed's known containers first, under their own names."""
    opt = optimizer
    for category, name in (
        ("low-precision partitions", "fp16_partitioned_groups_flat"),  # ZeRO-3
        ("low-precision partitions", "bit16_groups_flat"),  # ZeRO 1-2
        ("fp32 master partitions", "fp32_partitioned_groups_flat"),  # ZeRO-3
        ("fp32 master partitions", "single_partition_of_fp32_groups"),  # ZeRO 1-2
    ):
        for t in getattr(opt, name, None) or []:
            ledger.claim(category, t)
            if getattr(t, "grad", None) is not None:
                ledger.claim("fp32 master partitions .grad", t.grad)
    ledger.claim("low-precision partitions", getattr(opt, "lp_param_buffer", None))
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer; ZeRO-0 fp32 not
    for group in inner.param_groups:
        for p in group["params"]:
            ledger.claim("fp32 master partitions", p)
            if p.grad is not None:
                ledger.claim("fp32 master partitions .grad", p.grad)
    for state in inner.state.values():
        for v in state.values():
            ledger.claim("optimizer states (exp_avg, exp_avg_sq)", v)
    ledger.claim("gradient partitions", getattr(opt, "grad_partitions_flat_buffer", None))
    for bucket in (getattr(opt, "ipg_buckets", None) or {}).values():
        buffers = bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        for b in buffers:
            ledger.claim("reduce (IPG) buckets", b)
    for p in module.parameters():
        ledger.claim("low-precision partitions", getattr(p, "ds_tensor", None))
        ledger.claim("model parameters", p)
        if p.grad is not None:
            ledger.claim("model gradients", p.grad)
    for b in module.buffers():
        ledger.claim("model buffers (rotary)", b)


def _itemise(optimizer, engine) -> dict[str, int]:
    """Bytes per category of every tensor the optimizer and the engine reach."""
    ledger = _Ledger()
    _named(ledger, optimizer, engine.module)
    _walk(optimizer, "optimizer", ledger, set(), 0)
    _walk(engine, "engine", ledger, set(), 0)
    return dict(sorted(ledger.bytes.items()))


def _all_live_tensors() -> int:
    """Bytes of every storage a live Python tensor of this process holds (each once)."""
    import torch

    gc.collect()
    seen: dict[tuple[int, str], int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                key = _key(obj)
                if key is not None:
                    seen[key] = obj.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - some objects cannot even be isinstance-checked
            continue
    return sum(seen.values())


def _peak(fn) -> int:
    """The most bytes ``fn`` allocated beyond what was live when it started (torch profiler).

    torch's profiler with ``profile_memory`` records every allocation and free of the CPU
    allocator; their running sum in time order is the live-bytes curve of the call.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(spec: dict, zero_stage: int, dtype: str, env: dict, seq_len: int = 32) -> dict:
    """One rank's DeepSpeed tensors between steps and in a step (see the module doc).

    Args:
        spec: ``colocate.TinyModelSpec`` fields of the model.
        zero_stage: DeepSpeed ZeRO stage (0-3).
        dtype: The trainer's dtype (``"bfloat16"``, ``"float32"``, ...).
        env: The environment a trainer actor gets (its ``env`` argument; on CPU
            ``{"DS_ACCELERATOR": "cpu"}``), applied before DeepSpeed is imported.
        seq_len: Tokens of the one training sequence.

    Returns:
        ``params`` (counted as DeepSpeed partitions them), the run's ``reduce_bucket_size``
        and ``sub_group_size``; ``after_step`` and ``in_optimizer_step`` (bytes per category;
        the latter the largest over the torch optimizer's step calls); ``after_step_optimizer``
        (``after_step`` without the model's own parameters, gradients and buffers);
        ``after_step_all_live`` and ``before_step_2_all_live`` (every live tensor);
        ``peak_forward_backward`` and ``peak_optimizer_step`` (live bytes at each window's
        peak); ``seconds``.
    """
    os.environ.update(env)  # as TrainerActor.__init__ does, before DeepSpeed is imported
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import torch.distributed as dist

    from colocate import TinyModelSpec, TrainerConfig, build_tiny_model, lm_loss
    from colocate.actors.cpu.ds_ops import prepare_ops
    from colocate.actors.deepspeed_backend import DeepSpeedBackend, deepspeed_config
    from colocate.core.config import DType, ZeroStage

    t0 = time.monotonic()
    model_dir = str(build_tiny_model(TinyModelSpec(**spec)))
    config = TrainerConfig(model=model_dir, zero_stage=ZeroStage(zero_stage), dtype=DType(dtype))
    prepare_ops()
    torch.manual_seed(0)
    backend = DeepSpeedBackend(config, 0, 1)
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=60))
    backend.start(store, ("127.0.0.1", port), 60.0)
    engine, optimizer = backend.model, backend.optimizer
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, backend.module.config.vocab_size, (1, seq_len), generator=gen)
    ones = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "completion_mask": ones}
    # Step 1 through the trainer's own step (FusedAdam creates its states here) ...
    backend.step(lm_loss, [(batch, 1.0)], lambda: None)
    before = _all_live_tensors()
    # ... step 2 as DeepSpeedBackend.step makes it (one micro-batch), in two measured windows:
    # forward + backward (activations, gathered layers) and engine.step() (the optimizer's).
    inner = getattr(optimizer, "optimizer", optimizer)
    at_step: list[dict[str, int]] = []
    hook = inner.register_step_pre_hook(lambda *_: at_step.append(_itemise(optimizer, engine)))
    engine.set_gradient_accumulation_boundary(True)

    def backward() -> None:
        loss, _ = lm_loss(engine, batch)
        engine.backward(loss)

    peak_backward = _peak(backward)
    before_step = _all_live_tensors()
    peak_step = _peak(engine.step)
    hook.remove()
    gc.collect()
    after = _itemise(optimizer, engine)
    model_own = ("model parameters", "model gradients", "model buffers (rotary)")
    zero = deepspeed_config(config)["zero_optimization"]  # what start() gave DeepSpeed
    result = {
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in backend.module.parameters()),
        "zero_stage": zero_stage,
        "dtype": dtype,
        "reduce_bucket_size": zero.get("reduce_bucket_size"),
        "sub_group_size": zero.get("sub_group_size"),
        "after_step": after,
        "after_step_optimizer": sum(v for k, v in after.items() if k not in model_own),
        "after_step_all_live": _all_live_tensors(),
        "in_optimizer_step": max(at_step, key=lambda c: sum(c.values())) if at_step else {},
        "before_step_2_all_live": before,
        "peak_forward_backward": before + peak_backward,
        "peak_optimizer_step": before_step + peak_step,
        "seconds": round(time.monotonic() - t0, 1),
    }
    backend.shutdown()
    return result


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps(measure(**args)), flush=True)
