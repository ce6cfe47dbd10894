"""CUDA-only checks (marked ``gpu``; skipped without CUDA). They need CUDA torch only: no Ray,
vLLM or DeepSpeed (DeepSpeed's offload is checked when it is importable).

Run them all with ``tests/gpu/run_device_checks.sh``, which also prints the summary table.
"""

import json
import os
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


def test_cuda_ipc_transfer_bit_exact_and_fast(tmp_path):
    """Two processes on one GPU; 16 buckets of 256 MiB through CUDA IPC vs a D2D copy."""
    from weight_sync.buckets import Bucket
    from weight_sync.cuda_ipc import IpcSender
    from weight_sync.store import host_store
    from weight_sync.transport import Backend, Rendezvous

    nbytes, buckets = 256 << 20, 16
    store, port, sock = host_store("127.0.0.1", 2, 60.0, "gpu-check")
    rdv = Rendezvous("127.0.0.1", port, 2, "gpu-check", 60.0, Backend.CUDA_IPC)
    buffers = tuple(torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2))
    sender = IpcSender(rdv, store, buffers)
    out = tmp_path / "digest"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    peer = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("_ipc_peer.py")),
            str(port),
            str(buckets),
            str(nbytes),
            str(out),
        ],
        env=env,
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    payloads = [
        torch.randint(
            -(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda", generator=gen
        )
        for _ in range(buckets)
    ]
    expected = sum(int(p.sum(dtype=torch.int64)) for p in payloads)
    pending = [None, None]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, payload in enumerate(payloads):
        slot = i % 2
        if pending[slot] is not None:
            pending[slot].wait()
        buffers[slot].view(torch.int32).copy_(payload)  # the "pack"
        pending[slot] = sender.send(Bucket(i, (), nbytes), buffers[slot])
    for p in pending:
        p.wait()
    ipc_s = time.perf_counter() - start
    assert peer.wait(timeout=120) == 0
    sock.close()
    assert int(out.read_text()) == expected  # bit-exact: same int64 sum of every word
    src = torch.cat(payloads).view(torch.uint8)
    dst = torch.empty_like(src)
    d2d_s = _time_cuda(lambda: dst.copy_(src))
    # Sender pack + receiver read: each byte crosses memory twice per side, as in the D2D copy.
    ratio = d2d_s / ipc_s
    _record(
        "cuda_ipc",
        {
            "bytes": nbytes * buckets,
            "ipc_s": ipc_s,
            "d2d_copy_s": d2d_s,
            "throughput_vs_d2d": ratio,
            "target": 0.5,
        },
    )
    assert ratio >= 0.5, f"CUDA IPC at {ratio:.0%} of a device-to-device copy"


def _train_step(model, opt):
    x = torch.randn(8, 4096, device="cuda")
    model(x).pow(2).mean().backward()
    opt.step()


def test_torch_fallback_offload_frees_memory_and_restores_params():
    """The plain-torch trainer fallback: params, grads and Adam states to pinned host memory."""
    from colocate.config import TrainerConfig
    from colocate.trainer import TrainerActor

    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    actor = TrainerActor(
        TrainerConfig(model="unused", deepspeed=False), 0, 1, "trainer0", 0, None, {}
    )
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(16)]).cuda()
    actor.engine, actor.optimizer = model, torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, actor.optimizer)
    torch.cuda.synchronize()
    before = {n: p.detach().clone().cpu() for n, p in model.named_parameters()}
    training = free_before - torch.cuda.mem_get_info()[0]
    actor.offload(keep_params=False, tag=("gpu", 0))
    freed = torch.cuda.mem_get_info()[0] - (free_before - training)
    fraction = freed / training
    actor.reload(tag=("gpu", 0))
    same = all(torch.equal(before[n], p.detach().cpu()) for n, p in model.named_parameters())
    _train_step(model, actor.optimizer)  # training continues after reload
    _record(
        "torch_offload",
        {
            "training_bytes": training,
            "freed_bytes": freed,
            "freed_fraction": fraction,
            "target": 0.9,
            "params_identical_after_reload": same,
            "device_total_bytes": total,
        },
    )
    assert same
    assert fraction >= 0.9, f"offload freed {fraction:.0%} of the training memory"


def test_bucket_pack_cast_unpack_throughput():
    """fp32 -> bf16 flatten into a bucket and unflatten views, against a plain copy."""
    from weight_sync.buckets import TensorMeta, plan_buckets

    shapes = [(4096, 4096)] * 24 + [(4096,)] * 24
    params = [torch.randn(s, device="cuda") for s in shapes]
    metas = [TensorMeta(f"p{i}", s, torch.bfloat16) for i, s in enumerate(shapes)]
    plan = plan_buckets(metas, 1 << 30)
    (bucket,) = plan.buckets
    buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device="cuda")

    def pack():
        for (_, view), p in zip(bucket.views(buffer), params, strict=True):
            view.copy_(p)

    pack_s = _time_cuda(pack)
    views = dict(bucket.views(buffer))
    exact = all(torch.equal(views[f"p{i}"], p.to(torch.bfloat16)) for i, p in enumerate(params))
    flat = torch.cat([p.reshape(-1) for p in params])
    out = torch.empty_like(flat, dtype=torch.bfloat16)
    copy_s = _time_cuda(lambda: out.copy_(flat))
    ratio = copy_s / pack_s
    _record(
        "bucket_pack",
        {
            "bytes_out": bucket.nbytes,
            "pack_s": pack_s,
            "plain_cast_copy_s": copy_s,
            "pack_vs_plain": ratio,
            "exact": exact,
        },
    )
    assert exact
    assert ratio >= 0.5, f"packing runs at {ratio:.0%} of one flat cast-copy"


def test_deepspeed_offload_states_frees_memory():
    """ZeRO-3 offload_states on one GPU (skipped when DeepSpeed is not installed)."""
    deepspeed = pytest.importorskip("deepspeed")
    pytest.importorskip("deepspeed.runtime.zero.offload_config")
    import datetime

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    if not dist.is_initialized():
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60))
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(16)])
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "bf16": {"enabled": True},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    torch.cuda.synchronize()
    training = free_before - torch.cuda.mem_get_info()[0]
    engine.offload_states()
    torch.cuda.empty_cache()
    freed = torch.cuda.mem_get_info()[0] - (free_before - training)
    engine.reload_states()
    _record(
        "deepspeed_offload",
        {
            "training_bytes": training,
            "freed_bytes": freed,
            "freed_fraction": freed / training,
            "target": 0.9,
        },
    )
    assert freed / training >= 0.9
