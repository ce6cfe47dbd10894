"""The engine's sleep strategies without vLLM: which one the factory picks from the engine's
capabilities, and the calls each makes (a recording stand-in for ``vllm.LLM`` and for the
engine's call into its workers). That the page release frees memory for real is
``test_cpu_sleep.py``; that vLLM's sleep mode does is ``tests/gpu/test_engine_sleep.py``."""

import pytest

from colocate.actors.cpu.cpu_sleep import CpuSleepExtension
from colocate.actors.sleep import (
    SleepMechanism,
    SleepResult,
    SleepTag,
    choose_sleep,
    make_sleep_strategy,
)
from colocate.actors.sleep.cpu_pages import CpuPageRelease
from colocate.actors.sleep.vllm_mode import VllmSleepMode
from colocate.core.contract import EngineCapabilities

pytestmark = pytest.mark.fast


def _caps(device_type: str, sleep_supported: bool) -> EngineCapabilities:
    return EngineCapabilities("SomePlatform", device_type, sleep_supported, 1)


@pytest.mark.parametrize(
    ("device_type", "supported", "expected"),
    [
        ("cuda", True, SleepMechanism.VLLM_SLEEP_MODE),
        ("cpu", False, SleepMechanism.CPU_PAGE_RELEASE),
        # A CPU platform that had sleep mode would use it.
        ("cpu", True, SleepMechanism.VLLM_SLEEP_MODE),
        # Another platform without sleep mode keeps vLLM's calls (as before: they free nothing).
        ("xpu", False, SleepMechanism.VLLM_SLEEP_MODE),
    ],
)
def test_the_factory_picks_the_mechanism_from_the_capabilities(device_type, supported, expected):
    caps = _caps(device_type, supported)
    assert choose_sleep(caps) is expected
    built = make_sleep_strategy(caps, on_workers=lambda method, *args: [])
    kind = CpuPageRelease if expected is SleepMechanism.CPU_PAGE_RELEASE else VllmSleepMode
    assert type(built) is kind


class _Llm:
    """Records the sleep/wake calls a strategy makes on ``vllm.LLM``."""

    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("llm.sleep", level))

    def wake_up(self, tags):
        self.calls.append(("llm.wake_up", tuple(tags)))


def _worker_release(kv, weight=0, packed=0, kept=0) -> dict:
    return {
        "kv_bytes": kv,
        "weight_bytes": weight,
        "packed_bytes": packed,
        "kept_bytes": kept,
        "packed_bytes_estimate": packed,
        "trim_alone_bytes": 7,
        "pid": 1,
        "rss_before": 10,
        "rss_after": 5,
    }


def _cpu(per_worker):
    calls = []

    def on_workers(method, *args):
        calls.append((method.__name__, *args))
        return per_worker if method is CpuSleepExtension.cs_release else [0] * len(per_worker)

    return CpuPageRelease(on_workers), _Llm(calls), calls


def test_vllm_sleep_mode_only_calls_vllm_and_counts_nothing():
    calls = []
    llm, strategy = _Llm(calls), VllmSleepMode()
    assert strategy.release(llm, 2) == SleepResult(figures=None, weights_dropped=False)
    strategy.acquire(llm, SleepTag.WEIGHTS)
    strategy.acquire(llm, SleepTag.KV_CACHE)
    assert calls == [
        ("llm.sleep", 2),
        ("llm.wake_up", ("weights",)),
        ("llm.wake_up", ("kv_cache",)),
    ]


def test_cpu_level_1_releases_the_kv_cache_and_sums_the_workers():
    strategy, llm, calls = _cpu([_worker_release(100, kept=30), _worker_release(200, kept=40)])
    result = strategy.release(llm, 1)
    assert result.figures == {
        "kv_bytes": 300,
        "weight_bytes": 0,
        "packed_bytes": 0,
        "kept_bytes": 70,
        "total_bytes": 300,
        "workers": 2,
    }
    assert result.weights_dropped is False
    # Waking the weights and then the KV cache (the engine's wake_kv from asleep): vLLM wakes
    # both, but only the KV cache's pages were released, so only they are faulted back in.
    strategy.acquire(llm, SleepTag.WEIGHTS)
    strategy.acquire(llm, SleepTag.KV_CACHE)
    assert calls == [
        ("llm.sleep", 1),
        ("cs_release", 1),
        ("llm.wake_up", ("weights",)),
        ("llm.wake_up", ("kv_cache",)),
        ("cs_acquire", "kv_cache"),
    ]


def test_cpu_level_2_releases_the_weights_too_and_each_part_is_acquired_once():
    strategy, llm, calls = _cpu([_worker_release(100, weight=20, packed=5)])
    result = strategy.release(llm, 2)
    assert result.figures["total_bytes"] == 125 and result.figures["workers"] == 1
    assert result.weights_dropped is True
    # wake_weights, then wake_kv from WEIGHTS (the sync path): each part is faulted in once.
    strategy.acquire(llm, SleepTag.WEIGHTS)
    strategy.acquire(llm, SleepTag.KV_CACHE)
    strategy.acquire(llm, SleepTag.KV_CACHE)  # acquired already: vLLM only, no page touch
    assert calls == [
        ("llm.sleep", 2),
        ("cs_release", 2),
        ("llm.wake_up", ("weights",)),
        ("cs_acquire", "weights"),
        ("llm.wake_up", ("kv_cache",)),
        ("cs_acquire", "kv_cache"),
        ("llm.wake_up", ("kv_cache",)),
    ]
    # A later level-1 sleep releases the KV cache only: waking the weights touches nothing.
    del calls[:]
    strategy.release(llm, 1)
    strategy.acquire(llm, SleepTag.WEIGHTS)
    assert ("cs_acquire", "weights") not in calls
