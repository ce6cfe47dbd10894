"""Receiver process of the CUDA IPC check: maps the sender's buffers, copies each bucket out.

Arguments: port, timed buckets, bucket bytes. One untimed warm-up bucket comes first;
"peer-ready" is posted once the handles are mapped and the sink is allocated, so the sender's
clock never includes this process's start-up. After the timed part the sink (every timed
bucket as copied out, in order) is exported back over CUDA IPC ("sink"), and the process stays
until the sender has compared it with what it sent ("compared"), byte for byte.
"""

import datetime
import pickle
import sys

import torch
from torch.multiprocessing.reductions import reduce_tensor

from weight_sync.buckets import Bucket
from weight_sync.cuda_ipc import IpcReceiver
from weight_sync.transport import Backend, Rendezvous


def main() -> None:
    port, buckets, nbytes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
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
    torch.cuda.synchronize()
    receiver.store.set("sink", pickle.dumps(reduce_tensor(sink)))
    receiver.store.wait(["compared"], datetime.timedelta(seconds=300))
    receiver.close()


if __name__ == "__main__":
    main()
