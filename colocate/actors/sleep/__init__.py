"""How an engine's sleep frees its memory, and its wake takes it back.

One interface (:class:`SleepStrategy`, in ``strategy``), one implementation per mechanism:
vLLM's own sleep mode where the platform has one (``vllm_mode``: CUDA), and the project's page
release where vLLM refuses sleep mode (``cpu_pages``: its CPU build, over the worker extension
``colocate.actors.cpu.cpu_sleep`` and ``colocate.actors.cpu.page_release``). ``factory`` picks one
from the engine's capabilities, once, when the engine is built; only it knows both.
"""

from colocate.actors.sleep.factory import SleepMechanism, choose_sleep, make_sleep_strategy
from colocate.actors.sleep.strategy import SleepResult, SleepStrategy, SleepTag

__all__ = [
    "SleepMechanism",
    "SleepResult",
    "SleepStrategy",
    "SleepTag",
    "choose_sleep",
    "make_sleep_strategy",
]
