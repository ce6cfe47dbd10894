"""Packed sequences on CUDA (marked ``gpu``; skipped without CUDA): no Ray, vLLM or DeepSpeed.

The CPU equality tests (``tests/colocate/test_packing.py``) run SDPA on the CPU. Here the same
packed and padded forwards run on the GPU: SDPA in fp32 and bf16, and flash-attention varlen
(``attn_implementation="flash_attention_2"``) where the ``flash_attn`` package is installed.
"""

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from colocate import TinyModelSpec, build_tiny_model
from colocate.algorithms.losses import batch_logprobs
from colocate.algorithms.micro_batches import balanced_bins, fewest_bins
from colocate.algorithms.packing import check_packing, forward_packed, sequence_lengths

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]
RESULTS = Path(os.environ.get("GPU_RESULTS", "/tmp/gpu-results.json"))


def _record(key, value):
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2))


def _batch(vocab: int) -> dict:
    torch.manual_seed(0)
    lengths = [1, 64, 3, 17, 64, 9, 40, 2]
    ids = torch.randint(1, vocab, (len(lengths), 64))
    mask = (torch.arange(64) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _implementations() -> list[str]:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return ["sdpa"]
    return ["sdpa", "flash_attention_2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_logprobs_equal_padded_on_cuda(dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(TinyModelSpec(), cache_root=tmp_path)
    gaps = {}
    for impl in _implementations():
        if impl == "flash_attention_2" and dtype is torch.float32:
            continue  # flash-attention takes half precision only
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl)
        model = model.cuda().eval()
        batch = {k: v.cuda() for k, v in _batch(model.config.vocab_size).items()}
        lengths = sequence_lengths(batch)
        bins = balanced_bins(lengths, fewest_bins(lengths, 128))
        with torch.no_grad():
            check_packing(
                model, impl, model.config.vocab_size, atol=1e-4 if dtype is torch.float32 else 5e-2
            )
            padded = (batch_logprobs(model, batch) * batch["attention_mask"]).cpu()
            packed = forward_packed(
                functools.partial(batch_logprobs, model), batch, bins, lengths, torch.device("cuda")
            )
        gaps[impl] = float((packed - padded).abs().max())
    _record(f"packing_logprob_gap_{str(dtype).split('.')[-1]}", gaps)
    limit = 1e-4 if dtype is torch.float32 else 5e-2
    assert all(g <= limit for g in gaps.values()), gaps
