"""Receiver process of the CUDA IPC check: maps the sender's buffers, copies each bucket out.

Arguments: port, timed buckets, bucket bytes, digest file. One untimed warm-up bucket comes
first; "peer-ready" is posted once the handles are mapped and the sink is allocated, so the
sender's clock never includes this process's start-up.
"""

import sys

import torch

from weight_sync.buckets import Bucket
from weight_sync.cuda_ipc import IpcReceiver
from weight_sync.transport import Backend, Rendezvous


def main() -> None:
    port, buckets, nbytes, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.cuda.set_device(0)
    rdv = Rendezvous("127.0.0.1", port, 2, "gpu-check", 60.0, Backend.CUDA_IPC)
    receiver = IpcReceiver(rdv, 1, torch.device("cuda", 0))
    sink = torch.empty(buckets * nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    receiver.store.set("peer-ready", b"1")
    for i in range(buckets + 1):
        bucket = Bucket(i, (), nbytes)
        buf = receiver.receive(bucket).wait()
        # The "apply": copy every byte out of the mapped buffer before acknowledging it (the
        # warm-up bucket lands in slot 0, which the first timed bucket overwrites).
        j = max(i - 1, 0)
        sink[j * nbytes : (j + 1) * nbytes].copy_(buf[:nbytes])
        receiver.done(bucket)
    digest = int(sink.view(torch.int32).sum(dtype=torch.int64))  # after the timed part
    with open(out, "w") as f:
        f.write(str(digest))


if __name__ == "__main__":
    main()
