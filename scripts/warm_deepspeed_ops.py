"""Builds DeepSpeed's CPU C++ ops once (cached in ~/.cache/torch_extensions).

First use compiles them inside the first trainer actor (shm comm ~35 s, fused Adam ~65 s on the
2-core build machine), which would eat into a test's or the demo's time budget; the set-up
script runs this instead. On CUDA machines DeepSpeed builds its CUDA ops itself; nothing to do.
"""

import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

if __name__ == "__main__":
    import torch

    if torch.cuda.is_available():
        raise SystemExit(0)
    from deepspeed.accelerator import get_accelerator

    for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
        start = time.time()
        get_accelerator().create_op_builder(name).load(verbose=False)
        print(f"[setup] DeepSpeed op {name} ready in {time.time() - start:.1f} s")
