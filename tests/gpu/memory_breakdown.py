"""Where a DeepSpeed trainer's GPU memory outside torch's allocator goes (run on a CUDA machine).

Offloading can only return what torch's caching allocator holds; the CUDA context, NCCL's
communicator and the loaded kernel modules stay as long as the process lives. This script adds
each of them in turn in a fresh process and prints, after each, the device memory in use and
the part of it outside the allocator (``mem_get_info`` used minus ``memory_reserved``).
Run by ``run_device_checks.sh``; also ``python tests/gpu/memory_breakdown.py [JSON_OUT]``.
"""

import datetime
import json
import sys

import torch
import torch.distributed as dist


def main() -> None:
    if not torch.cuda.is_available():
        print("memory_breakdown: needs a CUDA device; skipped")
        return
    rows = []

    def row(name: str) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        used = total - free
        rows.append({"after": name, "device_used": used, "outside_allocator": used - reserved})

    torch.empty(1, device="cuda")
    row("CUDA context")
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(
        "nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    row("NCCL init (1 rank)")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(1 << 20, device="cuda", dtype=dtype)
        dist.all_reduce(x)
        dist.all_gather_into_tensor(torch.empty_like(x), x)
        dist.reduce_scatter_tensor(torch.empty_like(x), x)
    del x
    row("NCCL collectives (fp32, bf16)")
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(4096, 4096, device="cuda", dtype=dtype)
        (a @ a).sum().item()
        torch.nn.functional.linear(a[:8], a, a[0]).sum().item()
    del a
    row("matmuls (cuBLAS, fp32 and bf16)")
    from deepspeed.ops.adam import FusedAdam

    p = torch.nn.Parameter(torch.zeros(1 << 20, device="cuda"))
    p.grad = torch.ones_like(p)
    FusedAdam([p]).step()
    del p
    row("DeepSpeed FusedAdam (JIT module)")
    base = rows[0]["outside_allocator"]
    print(f"{'after':36} {'device used MiB':>16} {'outside allocator MiB':>22} {'+ context':>10}")
    for r in rows:
        print(
            f"{r['after']:36} {r['device_used'] >> 20:16d} {r['outside_allocator'] >> 20:22d} "
            f"{(r['outside_allocator'] - base) >> 20:10d}"
        )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
