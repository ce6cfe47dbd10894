"""Moving weights from trainer ranks to vLLM engine workers: buckets, transports, verification.

Pure parts (bucket layout, transfer-group planning, fingerprints) need no Ray; the transports
run inside trainer actors and inside vLLM workers (as a worker extension).
"""

from weight_sync.buckets import (
    Bucket,
    BucketPlan,
    TensorMeta,
    default_bucket_bytes,
    plan_buckets,
)
from weight_sync.errors import BucketPlanError, PackingError, VerificationError, WeightSyncError
from weight_sync.factory import make_receiver, make_sender
from weight_sync.fingerprint import Fingerprint, compare, fingerprint
from weight_sync.groups import Receiver, TransferGroup, choose_backend, plan_transfer_groups
from weight_sync.packing import LLAMA_PACKING, EngineWeights, Packing, packing_of_vllm_model
from weight_sync.receiver import EXTENSION_QUALNAME, ReceiveFaults, ReceiverSetup, SyncRequest
from weight_sync.sender import SendReport, WeightSender
from weight_sync.sources import DeepSpeedSource, ModuleSource, WeightSource, source_for
from weight_sync.stream import StreamStats, receive_stream, send_stream
from weight_sync.transport import Backend, Rendezvous

__all__ = [
    "EXTENSION_QUALNAME",
    "LLAMA_PACKING",
    "Backend",
    "Bucket",
    "BucketPlan",
    "BucketPlanError",
    "DeepSpeedSource",
    "EngineWeights",
    "Fingerprint",
    "ModuleSource",
    "Packing",
    "PackingError",
    "ReceiveFaults",
    "Receiver",
    "ReceiverSetup",
    "Rendezvous",
    "SendReport",
    "StreamStats",
    "SyncRequest",
    "TensorMeta",
    "TransferGroup",
    "VerificationError",
    "WeightSender",
    "WeightSource",
    "WeightSyncError",
    "choose_backend",
    "compare",
    "default_bucket_bytes",
    "fingerprint",
    "make_receiver",
    "make_sender",
    "packing_of_vllm_model",
    "plan_buckets",
    "plan_transfer_groups",
    "receive_stream",
    "send_stream",
    "source_for",
]
