"""Shared helpers of the benchmarks: machine facts, code version, timing, peak RSS, JSON out.

Nothing here re-implements the library: the benchmarks drive it through its public API and
only measure.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from colocate.testing.tiny_model import WEIGHTS_216MB
from weight_sync import Rendezvous
from weight_sync.collective import new_group

ROOT = Path(__file__).resolve().parent.parent

# The weight-sync benchmark model: 309 tensors, ~216 MB in bf16 (colocate.testing.tiny_model).
MODEL_SPEC = WEIGHTS_216MB


def gloo_group(rdv: Rendezvous, store, rank: int):
    """A gloo group of the benchmark's own (baselines and barriers), over ``store``."""
    return new_group(rdv, store, rank, torch.device("cpu"))


def broadcast(group, tensor: torch.Tensor) -> None:
    """One blocking broadcast of ``tensor`` from rank 0."""
    opts = dist.BroadcastOptions()
    opts.rootRank = opts.rootTensor = 0
    group.broadcast([tensor], opts).wait()


def timed(group, fn) -> dict:
    """Runs ``fn`` right after a 2-party barrier; its seconds, CPU seconds and own results."""
    group.allreduce([torch.zeros(1)]).wait()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn() or {}
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, **out}


def rss_extra(side: dict) -> int:
    """Peak minus starting RSS of a :class:`PeakRss` reading, clamped at 0.

    (The kernel updates the high-water mark lazily.)
    """
    return max(0, side["rss_peak"] - side["rss_before"])


def median(values: Iterable[float]) -> float:
    """Median (NaN for no values)."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: parallel work counted once."""
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def clipped(spans, start: float, end: float) -> list[tuple[float, float]]:
    """Intervals of ``spans`` (objects with ``start``/``end``) clipped to ``[start, end]``."""
    return [
        (max(s.start, start), min(s.end, end)) for s in spans if s.end > start and s.start < end
    ]


def add_model_args(p, hidden: int, intermediate: int, layers: int, heads: int = 4) -> None:
    """The tiny Llama's shape flags: ``--hidden``, ``--intermediate``, ``--layers``, ``--heads``."""
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)


def model_spec(args, max_len: int):
    """The ``TinyModelSpec`` of :func:`add_model_args`' flags (KV heads: half the heads)."""
    from colocate import TinyModelSpec

    return TinyModelSpec(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=max(512, max_len),
        seed=args.seed,
    )


def machine() -> dict:
    """Where the figures were measured."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg": os.getloadavg(),
    }


def code_version() -> dict:
    """The commit measured, and how many tracked files differ from it (read-only git calls)."""

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, timeout=30
            )
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"git_head": git("rev-parse", "HEAD") or None, "tracked_files_modified": len(changed)}


def write_json(path: str | None, results: dict) -> None:
    """Writes ``results`` to ``path`` (if given) and says where."""
    if path:
        out = Path(path).resolve()
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {out}")


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    """``PASS`` or ``MISS`` against a target."""
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else -1


RSS_METHOD = (
    "peak minus the RSS just before the sync, in each process. 'vmhwm': VmHWM from "
    "/proc/self/status after resetting it by writing '5' to /proc/self/clear_refs just before "
    "the sync; 'sampler-5ms' (fallback where clear_refs is not writable): a thread reading "
    "VmRSS every 5 ms"
)


class PeakRss:
    """Peak RSS of this process from now until :meth:`stop` (see ``RSS_METHOD``)."""

    def __init__(self) -> None:
        self._thread = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "vmhwm"
        except OSError:
            self.method = "sampler-5ms"
        self.before = _status_kib("VmRSS") * 1024
        if self.method != "vmhwm":
            self._peak, self._done = self.before, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self._peak = max(self._peak, _status_kib("VmRSS") * 1024)

    def stop(self) -> dict:
        """The RSS before, the peak, and the method."""
        if self._thread is None:
            peak = _status_kib("VmHWM") * 1024
        else:
            self._done.set()
            self._thread.join()
            peak = max(self._peak, _status_kib("VmRSS") * 1024)
        return {"rss_before": self.before, "rss_peak": peak, "rss_method": self.method}


def handover_latency(spans, release: str, acquire: str) -> list[float]:
    """Per GPU and hand-over: from the release's end to the acquisition's start."""
    out = []
    for lane in {lane for s in spans for lane in s.lanes}:
        groups: dict = {}
        for s in spans:
            if lane in s.lanes:
                groups.setdefault((s.phase, s.step, s.seq), {})[s.name] = s
        out += [
            g[acquire].start - g[release].end
            for g in groups.values()
            if {release, acquire} <= set(g)
        ]
    return out


def gc_probe(actor, rounds: int) -> dict:
    """Runs inside an actor (``__ray_call__``): a full ``gc.collect()``, median of ``rounds``."""
    import gc

    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        gc.collect()
        samples.append(time.perf_counter() - t)
    return {"gc_collect_s": sorted(samples)[rounds // 2], "tracked_objects": len(gc.get_objects())}
