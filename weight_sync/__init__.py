"""Moving weights from trainer ranks to vLLM engine workers: buckets, transports, verification.

Pure parts (bucket layout, transfer-group planning, fingerprints) need no Ray; the transports
run inside trainer actors and inside vLLM workers (as a worker extension).
"""

from weight_sync.buckets import (
    DEFAULT_FUSED_GROUPS,
    Bucket,
    BucketPlan,
    TensorMeta,
    default_bucket_bytes,
    fused_group_key,
    plan_buckets,
)
from weight_sync.errors import BucketPlanError, VerificationError, WeightSyncError
from weight_sync.factory import choose_backend, make_receiver, make_sender
from weight_sync.fingerprint import Fingerprint, compare, fingerprint
from weight_sync.groups import Receiver, TransferGroup, plan_transfer_groups
from weight_sync.receiver import EXTENSION_QUALNAME, ReceiveFaults, ReceiverSetup, SyncRequest
from weight_sync.sender import SendReport, WeightSender
from weight_sync.sources import DeepSpeedSource, ModuleSource, WeightSource, source_for
from weight_sync.stream import StreamStats, receive_stream, send_stream
from weight_sync.transport import Backend, Rendezvous

__all__ = [
    "DEFAULT_FUSED_GROUPS",
    "EXTENSION_QUALNAME",
    "Backend",
    "Bucket",
    "BucketPlan",
    "BucketPlanError",
    "DeepSpeedSource",
    "Fingerprint",
    "ModuleSource",
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
    "fused_group_key",
    "make_receiver",
    "make_sender",
    "plan_buckets",
    "plan_transfer_groups",
    "receive_stream",
    "send_stream",
    "source_for",
]
