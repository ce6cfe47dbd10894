"""CUDA-only checks (marked ``gpu``; skipped without CUDA). They need CUDA torch only: no Ray,
vLLM or DeepSpeed (DeepSpeed's offload is checked when it is importable).

Run them all with ``tests/gpu/run_device_checks.sh``, which also prints the summary table.
"""

import datetime
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("GPU_RESULTS", "/tmp/gpu-results.json"))


def _record(key, value):
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2))


def _time_cuda(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


_TOTAL_BYTES = 4 << 30
_BUCKET_SIZES = (64 << 20, 512 << 20, 1 << 30)  # 512 MiB is the CUDA default


def _ipc_run(nbytes: int, pipeline: bool) -> dict:
    """One sender (this process) and one receiver process on one GPU; 4 GiB in buckets.

    ``pipeline=False`` times the transport alone: every bucket is already packed in its own
    exported buffer, and the clock covers the handshakes plus the receiver's copy-out.
    ``pipeline=True`` times what a sync does: two exported buffers, and each bucket is packed
    (a device copy) into a free one before it is sent, so the sender's pack and the receiver's
    copy-out share the GPU.
    """
    from weight_sync.buckets import Bucket
    from weight_sync.cuda_ipc import IpcSender
    from weight_sync.store import host_store
    from weight_sync.transport import Backend, Rendezvous

    buckets = _TOTAL_BYTES // nbytes
    gen = torch.Generator(device="cuda").manual_seed(nbytes)
    payloads = [
        torch.randint(
            -(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda", generator=gen
        )
        for _ in range(buckets)
    ]
    if pipeline:
        buffers = tuple(torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2))
    else:
        buffers = tuple(p.view(torch.uint8) for p in payloads)
    store, port, sock = host_store("127.0.0.1", 2, 60.0, "gpu-check")
    rdv = Rendezvous("127.0.0.1", port, 2, "gpu-check", 60.0, Backend.CUDA_IPC)
    sender = IpcSender(rdv, store, buffers)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    peer = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_ipc_peer.py"))]
        + [str(port), str(buckets), str(nbytes)],
        env=env,
    )
    try:
        sender.store.wait(["peer-ready"], datetime.timedelta(seconds=120))
        if pipeline:
            buffers[0].view(torch.int32).copy_(payloads[0])
        sender.send(Bucket(0, (), nbytes), buffers[0]).wait()  # warm-up, untimed
        pending: list = [None] * len(buffers)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i, payload in enumerate(payloads):
            slot = i % len(buffers)
            if pending[slot] is not None:
                pending[slot].wait()
            if pipeline:
                buffers[slot].view(torch.int32).copy_(payload)  # the pack
            pending[slot] = sender.send(Bucket(i + 1, (), nbytes), buffers[slot])
        for p in pending:
            if p is not None:
                p.wait()
        ipc_s = time.perf_counter() - start
        mismatched = _compare_sink(sender.store, payloads, nbytes)
        assert peer.wait(timeout=120) == 0
    finally:
        if peer.poll() is None:
            peer.kill()
        sock.close()
    src = torch.cat(payloads).view(torch.uint8)
    dst = torch.empty_like(src)
    d2d_s = _time_cuda(lambda: dst.copy_(src))
    src = dst = payloads = buffers = None  # free 12 GiB before the next run
    torch.cuda.empty_cache()
    return {
        "bucket_bytes": nbytes,
        "buckets": buckets,
        "pipeline": pipeline,
        "ipc_s": ipc_s,
        "d2d_copy_s": d2d_s,
        "throughput_vs_d2d": d2d_s / ipc_s,
        "bit_exact": not mismatched,
        "mismatched_buckets": mismatched,
    }


def _compare_sink(store, payloads: list, nbytes: int) -> list[int]:
    """The timed buckets whose bytes, as the peer copied them out, differ from those sent.

    The peer exports its sink over CUDA IPC; each bucket of it is compared with the payload
    sent in it by ``torch.equal`` on the device, then the mapping is dropped and the peer told
    it may exit.
    """
    from weight_sync.cuda_ipc import _DEVICE_ARG

    store.wait(["sink"], datetime.timedelta(seconds=120))
    rebuild, args = pickle.loads(store.get("sink"))
    args = list(args)
    args[_DEVICE_ARG] = torch.cuda.current_device()
    sink = rebuild(*args)
    try:
        assert sink.numel() == len(payloads) * nbytes, (sink.numel(), len(payloads), nbytes)
        return [
            j
            for j, payload in enumerate(payloads)
            if not torch.equal(sink[j * nbytes : (j + 1) * nbytes], payload.view(torch.uint8))
        ]
    finally:
        del sink
        torch.cuda.synchronize()
        torch.cuda.ipc_collect()
        store.set("compared", b"1")


def test_cuda_ipc_transfer_bit_exact_and_fast():
    """4 GiB through CUDA IPC between two processes on one GPU, against a D2D copy of it.

    Every run must be bit-exact: each timed bucket, as the receiver copied it out, is compared
    with the payload sent in it by ``torch.equal`` (the receiver exports its copies back over
    CUDA IPC). The target (>= 50 % of a device-to-device copy) is checked on the transport
    alone at the default CUDA bucket size; the other bucket sizes and the pack-and-send
    pipeline are measured and recorded beside it.
    """
    runs = [_ipc_run(n, pipeline=False) for n in _BUCKET_SIZES]
    runs += [_ipc_run(512 << 20, pipeline=True)]
    headline = runs[1]
    _record(
        "cuda_ipc",
        {
            "bytes": _TOTAL_BYTES,
            "throughput_vs_d2d": headline["throughput_vs_d2d"],
            "target": 0.5,
            "runs": runs,
        },
    )
    for run in runs:
        print(
            f"IPC {run['bucket_bytes'] >> 20:5d} MiB buckets, "
            f"{'pack+send' if run['pipeline'] else 'transport'}: {run['ipc_s'] * 1e3:.2f} ms, "
            f"D2D {run['d2d_copy_s'] * 1e3:.2f} ms, ratio {run['throughput_vs_d2d']:.3f}, "
            f"bit-exact {run['bit_exact']}"
        )
    assert all(run["bit_exact"] for run in runs), runs
    ratio = headline["throughput_vs_d2d"]
    assert ratio >= 0.5, f"CUDA IPC at {ratio:.0%} of a device-to-device copy"


def _train_step(model, opt):
    x = torch.randn(8, 4096, device="cuda")
    model(x).pow(2).mean().backward()
    opt.step()


def test_torch_fallback_offload_frees_memory_and_restores_params():
    """The plain-torch trainer fallback: params, grads and Adam states to pinned host memory."""
    from colocate.actors.trainer import TrainerActor
    from colocate.core.config import TrainerConfig
    from colocate.core.contract import Seat

    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()

    class MlpTrainer(TrainerActor):
        def load_model(self):
            return _big_mlp()

    config = TrainerConfig(model="unused", deepspeed=False, lr=1e-3)
    actor = MlpTrainer(Seat("trainer", 0, 1, (0,), config))
    actor.start(actor.host_group_store(False, 60.0), 60.0)
    model, optimizer = actor.backend.module, actor.backend.optimizer
    _train_step(model, optimizer)
    torch.cuda.synchronize()
    before = {n: p.detach().clone().cpu() for n, p in model.named_parameters()}
    states = [
        {k: v.clone().cpu() for k, v in st.items() if torch.is_tensor(v)}
        for st in optimizer.state.values()
    ]
    training = free_before - torch.cuda.mem_get_info()[0]
    actor.offload(keep_params=False)
    freed = torch.cuda.mem_get_info()[0] - (free_before - training)
    fraction = freed / training
    actor.reload()
    same = all(torch.equal(before[n], p.detach().cpu()) for n, p in model.named_parameters())
    same_states = all(
        torch.equal(v, st[k].cpu())
        for old, st in zip(states, optimizer.state.values(), strict=True)
        for k, v in old.items()
    )
    _train_step(model, optimizer)  # training continues after reload
    _record(
        "torch_offload",
        {
            "training_bytes": training,
            "freed_bytes": freed,
            "freed_fraction": fraction,
            "target": 0.9,
            "params_identical_after_reload": same,
            "adam_states_identical_after_reload": same_states,
            "device_total_bytes": total,
        },
    )
    assert same and same_states
    assert fraction >= 0.9, f"offload freed {fraction:.0%} of the training memory"


def test_bucket_pack_cast_unpack_throughput():
    """fp32 -> bf16 flatten into a bucket and unflatten views, against a plain copy."""
    from weight_sync import LLAMA_PACKING, TensorMeta, plan_buckets

    shapes = [(4096, 4096)] * 24 + [(4096,)] * 24
    params = [torch.randn(s, device="cuda") for s in shapes]
    metas = [TensorMeta(f"p{i}", s, torch.bfloat16) for i, s in enumerate(shapes)]
    plan = plan_buckets(metas, 1 << 30, LLAMA_PACKING)
    (bucket,) = plan.buckets
    buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device="cuda")

    views = bucket.views(buffer)  # made once per bucket, as the sender caches them

    def pack():
        for (_, view), p in zip(views, params, strict=True):
            view.copy_(p)

    def pack_with_views():  # the first sync, which also builds the views
        for (_, view), p in zip(bucket.views(buffer), params, strict=True):
            view.copy_(p)

    pack_s = _time_cuda(pack)
    first_pack_s = _time_cuda(pack_with_views)
    exact = all(torch.equal(views[i][1], p.to(torch.bfloat16)) for i, p in enumerate(params))
    flat = torch.cat([p.reshape(-1) for p in params])
    out = torch.empty_like(flat, dtype=torch.bfloat16)
    copy_s = _time_cuda(lambda: out.copy_(flat))
    ratio = copy_s / pack_s
    _record(
        "bucket_pack",
        {
            "bytes_out": bucket.nbytes,
            "pack_s": pack_s,
            "pack_building_views_s": first_pack_s,
            "pack_building_views_vs_plain": copy_s / first_pack_s,
            "plain_cast_copy_s": copy_s,
            "pack_vs_plain": ratio,
            "exact": exact,
        },
    )
    assert exact
    assert ratio >= 0.5, f"packing runs at {ratio:.0%} of one flat cast-copy"


def _torch_bytes() -> dict:
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "device_used": int(torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]),
    }


def _largest_cuda_tensors(n: int = 12) -> list:
    import gc

    seen, rows = set(), []
    for obj in gc.get_objects():
        try:
            if not (torch.is_tensor(obj) and obj.is_cuda):
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - some objects refuse inspection
            continue
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        rows.append((storage.nbytes(), tuple(obj.shape), str(obj.dtype)))
    rows.sort(reverse=True)
    return [{"bytes": b, "shape": list(s), "dtype": d} for b, s, d in rows[:n]]


def _big_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(16)])


def test_deepspeed_offload_states_moves_training_tensors_off_gpu_and_restores_them_bit_exact():
    """The trainer actor's ZeRO-3 offload (DeepSpeed ``offload_states``) on one GPU.

    Skipped where DeepSpeed is not installed. The actor builds its DeepSpeed engine exactly as
    in a run (its own group store, DeepSpeed's AdamW = FusedAdam, JIT-built here); only the
    model is swapped for a 268M-parameter MLP. Asserts: the bf16 partitions and the fp32
    master weights are bit-identical after ``reload_states``; after the full offload at most
    10 % of the training tensors' bytes are still allocated on the GPU; and, with expandable
    segments (the trainer actors' setting), >= 90 % of torch's reserved memory is returned.
    The device memory freed (``mem_get_info``, by the TRAIN -> SYNC release and by the full
    offload) is measured and recorded, not asserted: CUDA context, NCCL and kernels stay.
    """
    pytest.importorskip("deepspeed")
    from colocate.actors.trainer import TrainerActor
    from colocate.core.config import TrainerConfig
    from colocate.core.contract import Seat

    class MlpTrainer(TrainerActor):
        def load_model(self):
            return _big_mlp()

    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    torch_bytes = {"before": _torch_bytes()}
    config = TrainerConfig(model="unused", dtype="bfloat16", lr=1e-3)
    actor = MlpTrainer(Seat("trainer", 0, 1, (0,), config))
    master = actor.host_group_store(False, 60.0)
    actor.start(master, 60.0)
    torch_bytes["after_start"] = _torch_bytes()
    engine = actor.backend.model
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    torch.cuda.synchronize()
    training = free_before - torch.cuda.mem_get_info()[0]
    torch_bytes["after_step"] = _torch_bytes()
    opt = engine.optimizer
    # Copies on the host: a device copy would itself hold memory the offload should free.
    lp_before = [p.ds_tensor.detach().cpu() for p in engine.module.parameters()]
    hp_before = [t.detach().cpu() for t in opt.fp32_partitioned_groups_flat]

    actor.offload(keep_params=True)
    torch.cuda.synchronize()
    freed_keep = torch.cuda.mem_get_info()[0] - (free_before - training)
    torch_bytes["after_offload_keep_params"] = _torch_bytes()
    actor.offload(keep_params=False)
    torch.cuda.synchronize()
    freed = torch.cuda.mem_get_info()[0] - (free_before - training)
    torch_bytes["after_offload"] = _torch_bytes()
    remaining = _largest_cuda_tensors()
    actor.reload()
    torch.cuda.synchronize()
    params = list(engine.module.parameters())
    same_lp = all(torch.equal(a, p.ds_tensor.cpu()) for a, p in zip(lp_before, params, strict=True))
    hp_after = opt.fp32_partitioned_groups_flat
    same_hp = all(torch.equal(a, b.cpu()) for a, b in zip(hp_before, hp_after, strict=True))
    engine.backward(engine(x).float().pow(2).mean())  # training continues after reload
    engine.step()
    # What the offload controls is torch's allocator; the rest of the device memory (CUDA
    # modules, NCCL) stays with the process (tests/gpu/memory_breakdown.py attributes it).
    reserved = torch_bytes["after_step"]["reserved"]
    allocator_freed = (reserved - torch_bytes["after_offload"]["reserved"]) / reserved
    _record(
        "deepspeed_offload" + os.environ.get("GPU_CHECK_TAG", ""),
        {
            "training_bytes": training,
            "freed_bytes_keep_params": freed_keep,
            "freed_fraction_keep_params": freed_keep / training,
            "freed_bytes": freed,
            "freed_fraction": freed / training,
            "target": 0.9,
            "allocator_freed_fraction": allocator_freed,
            "bf16_partitions_identical_after_reload": same_lp,
            "fp32_master_identical_after_reload": same_hp,
            "optimizer": type(opt.optimizer).__name__,
            "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "torch_allocator": torch_bytes,
            "largest_cuda_tensors_after_offload": remaining,
        },
    )
    assert same_lp and same_hp
    # The training tensors left the GPU, whatever the allocator keeps cached (1.3 % measured).
    live = torch_bytes["after_offload"]["allocated"] / torch_bytes["after_step"]["allocated"]
    assert live <= 0.1, f"{live:.0%} of the training tensors stayed on the GPU"
    if "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        # The trainer actors' setting on CUDA (colocate/core/fleet.py).
        assert allocator_freed >= 0.9, f"offload returned {allocator_freed:.0%} of the allocator"
