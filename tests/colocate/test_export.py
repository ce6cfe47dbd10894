"""Chunking of the streamed fingerprints and export (pure; the real export is exercised by
tests/colocate/test_micro_batches.py and tests/weight_sync/test_families.py)."""

import pytest
import torch

from colocate.actors.export import weight_chunks
from weight_sync import TensorMeta

pytestmark = pytest.mark.fast


def _metas(*sizes):
    return [TensorMeta(f"t{i}", (n,), torch.float32) for i, n in enumerate(sizes)]


def test_chunks_keep_order_and_bound_bytes():
    chunks = weight_chunks(_metas(10, 10, 10, 30, 5), chunk_bytes=80)  # 40 bytes per 10
    assert chunks == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    # a tensor larger than the chunk is a chunk of its own, never split
    assert weight_chunks(_metas(100, 1), chunk_bytes=16) == [["t0"], ["t1"]]


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        weight_chunks(_metas(1), 0)
