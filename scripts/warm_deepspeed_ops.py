"""Builds DeepSpeed's CPU C++ ops once, into this environment's own cache.

The build itself is ``colocate.actors.cpu.ds_ops``. First use compiles them (shm comm ~35 s,
fused Adam ~65 s on the 2-core build machine), which
would eat into a test's or the demo's time budget; the set-up script runs this instead, with
the same ninja and cache directory every trainer actor uses, so no run rebuilds them. On CUDA
machines the CUDA ops are built by the first trainer the same way (under the same lock).
"""

import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # this process only: it starts no workers

if __name__ == "__main__":
    import torch

    if torch.cuda.is_available():
        raise SystemExit(0)
    from colocate.actors.cpu.ds_ops import extensions_dir, prepare_ops

    start = time.time()
    for name, seconds in prepare_ops().items():
        print(f"[setup] DeepSpeed op {name} ready in {seconds:.1f} s")
    print(f"[setup] DeepSpeed ops in {extensions_dir()} ({time.time() - start:.1f} s)")
