"""vLLM sleep mode on CUDA frees the engine's memory (needs CUDA and CUDA vLLM: skipped where
either is missing, e.g. on the CPU build machine and on a device machine without vLLM)."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    # Checked before the tiny-model fixture runs (a device machine has no vLLM to test).
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs CUDA vLLM"),
]


def test_sleep_frees_engine_memory_and_wake_restores_service(tiny_model_dir):
    from colocate.actors.engine import EngineActor
    from colocate.core.config import EngineConfig, Sampling
    from colocate.core.contract import Seat
    from colocate.core.phases import EngineMemory

    free0, total = torch.cuda.mem_get_info()
    config = EngineConfig(model=tiny_model_dir, gpu_memory_utilization=0.3, kv_cache_bytes=None)
    engine = EngineActor(
        Seat("engine", 0, 1, (0,), config, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    )
    caps = engine.start()
    assert caps.sleep_supported
    greedy = Sampling(n=1, max_tokens=8, temperature=0.0)
    before = [c.token_ids for c in engine.generate(["kato rimu"], greedy)]
    awake = free0 - torch.cuda.mem_get_info()[0]
    # The engine holds the share of the device it was given (0.3), so what sleep frees below
    # is a real amount, not the noise of a tiny footprint.
    assert awake >= 0.2 * total, f"awake the engine holds {awake / total:.0%} of the device"
    engine.sleep(1)
    asleep = free0 - torch.cuda.mem_get_info()[0]
    assert asleep < 0.1 * awake, f"asleep holds {asleep / awake:.0%} of {awake} bytes"
    assert engine.wake_kv() is EngineMemory.AWAKE  # level 1: weights came back
    assert [c.token_ids for c in engine.generate(["kato rimu"], greedy)] == before
    engine.shutdown()
