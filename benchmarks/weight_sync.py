"""Weight-sync benchmark on CPU (gloo): our bucketed sync vs the transport limit and the naive way.

A synthetic Llama-shaped model (>= 300 tensors, >= 200 MB in bf16, a real HF directory built by
``colocate.tiny_model``) is sent from a sender actor (the trainer side: ``ModuleSource`` +
``WeightSender`` over ``make_sender``, as ``colocate/trainer.py`` does) into a real vLLM CPU
engine running in-process inside a Ray actor (``colocate.engine.EngineActor``, subclassed here to
add the benchmark's receive paths). Four kinds are measured, alternating within every repeat:

- ``raw_flat``: one broadcast of all the bytes as one uint8 tensor into an already-written receive
  buffer, over a gloo group between the two processes: the transport's limit.
- ``ours_transfer``: our bucketed transfer alone: ``CollectiveSender`` packs and broadcasts the
  buckets, a ``CollectiveReceiver`` (two pre-touched buffers, double buffering) receives without
  applying.
- ``ours_total``: our sync end to end through ``EngineActor.receive_weights`` (the worker
  extension's ``ws_receive``: receive + apply) and the prefix-cache reset: ready to generate.
- ``per_tensor``: the naive baseline of vLLM's RLHF example: per tensor, one RPC to the engine and
  one broadcast of that tensor into a fresh tensor; each fused group (q/k/v, gate/up) applied by
  one ``reload_weights(..., is_checkpoint_format=True)`` as soon as its last member arrived.

Diagnostics in the same alternation (reported, not targets): ``bucketed_no_pack`` (our send loop
over the already-packed buffers: bucketing without the cast/pack) and ``ours_total_verified``
(``ours_total`` with fingerprints on both sides, compared after every repeat). The three
transfer-only kinds run ``--inner`` rounds per repeat (cheap; steadier medians), and process CPU
time is recorded on both sides.

Timer (all kinds): in the engine process, from just after a 2-party barrier (a gloo allreduce of
one element on the benchmark's own group, so neither side starts with a head start) to the end
of the receiver's last step; for ``per_tensor`` the barrier opens the session and the final RPC
(after the last apply and the prefix-cache reset) closes it. The driver's wall time of each
repeat is recorded beside it. Peak RSS: ``VmHWM`` from ``/proc/self/status`` after resetting it
by writing ``5`` to ``/proc/self/clear_refs`` (exact, kernel-tracked), in each process; where
that file is not writable, a thread sampling VmRSS every 5 ms.

Run: ``.venv/bin/python benchmarks/weight_sync.py --json out.json`` (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

# This file is named like the package it measures: keep its own folder off the import path (and
# so off the Ray workers' path, which Ray copies from the driver's), or `import weight_sync`
# would import this script.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import ray  # noqa: E402
import torch  # noqa: E402

from colocate.config import EngineConfig, Sampling  # noqa: E402
from colocate.engine import EngineActor  # noqa: E402
from colocate.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402
from weight_sync.buckets import (  # noqa: E402
    DEFAULT_FUSED_GROUPS,
    default_bucket_bytes,
    fused_group_key,
)
from weight_sync.transport import Backend, Rendezvous  # noqa: E402

# hidden 512 (8 heads of 64, 4 KV heads), MLP 1536, 34 layers: 9 * 34 + 3 = 309 tensors,
# ~216 MB in bf16 (the vocabulary stays small for the locally trained tokenizer).
MODEL_SPEC = TinyModelSpec(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=1024,
    max_position_embeddings=512,
    seed=0,
)
KINDS = ("raw_flat", "ours_transfer", "ours_total", "per_tensor")
# Diagnostic, measured in the same alternation: our bucketed broadcast of the already-packed
# buffers (WeightSender's loop minus the pack): separates the cost of bucketing from packing.
# The same for ours_total with verify=True (both sides fingerprint every tensor; the
# coordinator's default), compared after every repeat.
DIAG_KINDS = ("bucketed_no_pack", "ours_total_verified")
CHEAP_KINDS = ("raw_flat", "bucketed_no_pack", "ours_transfer")  # --inner rounds per repeat
FULL_KINDS = ("ours_total", "ours_total_verified", "per_tensor")
TARGETS = {"transfer_vs_raw": 1.3, "speedup_vs_per_tensor": 10.0, "rss_extra_over_bucket": 3.0}
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload"
PROMPTS = ["kato rimu sena", "lo pe vi da"]
TIMER = (
    "receiver-side: perf_counter in the engine process, from just after a 2-party gloo "
    "allreduce barrier to the end of the receiver's last step (ours_total: after ws_receive's "
    "apply and reset_prefix_cache; per_tensor: after the last reload_weights and "
    "reset_prefix_cache); driver wall time of each repeat recorded beside it"
)
RSS_METHOD = (
    "peak minus the RSS just before the sync, in each process. 'vmhwm': VmHWM from "
    "/proc/self/status after resetting it by writing '5' to /proc/self/clear_refs just before "
    "the sync (before the barrier); 'sampler-5ms' (fallback where clear_refs is not writable): "
    "a thread reading VmRSS every 5 ms"
)


# ----- process-local helpers (run in the actors) ------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else -1


class _PeakRss:
    """Peak RSS of this process from now until :meth:`stop` (see ``RSS_METHOD``)."""

    def __init__(self):
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


def _barrier(group) -> None:
    group.allreduce([torch.zeros(1)]).wait()


def _broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    group.broadcast([tensor], opts).wait()


def _real_worker(worker):
    # collective_rpc(callable) hands over vLLM's WorkerWrapperBase; attributes live on its worker.
    return getattr(worker, "worker", worker)


# ----- functions run inside the vLLM worker through llm.collective_rpc --------------------------


def _w_join(worker, rdv: Rendezvous, metas: list, total_bytes: int) -> dict:
    """Joins the benchmark group (raw, per-tensor, barriers) and pre-touches the flat buffer."""
    from types import SimpleNamespace

    from weight_sync.collective import new_group
    from weight_sync.store import join_store

    logging.getLogger(RELOAD_LOGGER).setLevel(logging.ERROR)
    store = join_store(rdv.host, rdv.port, rdv.world_size, rdv.timeout_s, rdv.key)
    w = _real_worker(worker)
    w._bench = SimpleNamespace(
        group=new_group(rdv, store, 1, torch.device("cpu")),
        flat=torch.empty(total_bytes, dtype=torch.uint8).fill_(1),  # written: no page faults
        group_sizes=Counter(fused_group_key(m.name, DEFAULT_FUSED_GROUPS) for m in metas),
        pending={},
        reloads=0,
        xfer=None,
        plan=None,
    )
    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}


def _w_setup_xfer(worker, rdv: Rendezvous, plan) -> None:
    from weight_sync.collective import CollectiveReceiver

    st = _real_worker(worker)._bench
    st.plan = plan
    st.xfer = CollectiveReceiver(rdv, 1, plan.max_bucket_bytes, torch.device("cpu"))


def _w_barrier(worker) -> None:
    _barrier(_real_worker(worker)._bench.group)


def _w_raw(worker) -> None:
    st = _real_worker(worker)._bench
    _broadcast(st.group, st.flat)


def _w_transfer(worker) -> dict:
    """Our receive loop (as ``ws_receive`` runs it) without the apply."""
    st = _real_worker(worker)._bench
    buckets = st.plan.buckets
    wait_s = 0.0
    pending = st.xfer.receive(buckets[0])
    for i, bucket in enumerate(buckets):
        t0 = time.perf_counter()
        pending.wait()
        wait_s += time.perf_counter() - t0
        if i + 1 < len(buckets):
            pending = st.xfer.receive(buckets[i + 1])
        st.xfer.done(bucket)
    return {"wait_s": wait_s}


def _w_pt_recv(worker, name: str, shape: tuple, dtype: torch.dtype) -> None:
    """Naive (vLLM's RLHF example): receive into a fresh tensor; apply a completed group."""
    w = _real_worker(worker)
    st = w._bench
    tensor = torch.empty(shape, dtype=dtype)
    _broadcast(st.group, tensor)
    key = fused_group_key(name, DEFAULT_FUSED_GROUPS)
    group = st.pending.setdefault(key, [])
    group.append((name, tensor))
    if len(group) == st.group_sizes[key]:
        del st.pending[key]
        w.reload_weights(weights_iterator=iter(group), is_checkpoint_format=True)
        st.reloads += 1


def _w_pt_end(worker) -> int:
    st = _real_worker(worker)._bench
    if st.pending:
        raise RuntimeError(f"per-tensor session ended with incomplete groups: {list(st.pending)}")
    reloads, st.reloads = st.reloads, 0
    return reloads


# ----- the actors -------------------------------------------------------------------------------


class BenchEngine(EngineActor):
    """``EngineActor`` plus the benchmark's receive paths (run in the worker by collective_rpc)."""

    def _rpc(self, fn, *args):
        return self._require_llm().collective_rpc(fn, args=args)[0]

    def bench_join(self, rdv: Rendezvous, metas: list, total_bytes: int) -> dict:
        """Joins the benchmark group (concurrently with the sender)."""
        return self._rpc(_w_join, rdv, metas, total_bytes)

    def bench_setup_xfer(self, rdv: Rendezvous, plan) -> None:
        """Builds the transfer-only receiver (concurrently with the sender)."""
        self._rpc(_w_setup_xfer, rdv, plan)

    def bench_raw(self) -> dict:
        """One flat broadcast into the pre-touched buffer."""
        self._rpc(_w_barrier)
        t0, c0 = time.perf_counter(), time.process_time()
        self._rpc(_w_raw)
        return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    def bench_transfer(self) -> dict:
        """Our bucketed receive, no apply."""
        self._rpc(_w_barrier)
        t0, c0 = time.perf_counter(), time.process_time()
        out = self._rpc(_w_transfer)
        return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, **out}

    def bench_total(self, request, tag: tuple[str, int]) -> dict:
        """Our sync end to end (receive_weights: ws_receive + prefix-cache reset)."""
        rss = _PeakRss()
        self._rpc(_w_barrier)
        t0, c0 = time.perf_counter(), time.process_time()
        reports = self.receive_weights(request, tag)
        seconds = time.perf_counter() - t0
        return {
            "seconds": seconds,
            "cpu_s": time.process_time() - c0,
            **rss.stop(),
            "report": reports[0],
        }

    def pt_begin(self) -> None:
        """Opens a per-tensor session (the barrier starts its clock)."""
        self._rpc(_w_barrier)
        self._pt_t0 = time.perf_counter()

    def pt_recv(self, name: str, shape: tuple, dtype: torch.dtype) -> None:
        """One naive per-tensor update RPC."""
        self._rpc(_w_pt_recv, name, shape, dtype)

    def pt_end(self) -> dict:
        """Closes the session: ready to generate."""
        reloads = self._rpc(_w_pt_end)
        self._require_llm().reset_prefix_cache()
        return {"seconds": time.perf_counter() - self._pt_t0, "reloads": reloads}

    def bench_info(self) -> dict:
        """Pid and thread count of the engine process."""
        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}


class BenchSender:
    """The trainer side: the HF model, our sender (as ``TrainerActor``), and the baselines."""

    def __init__(self, model_dir: str, dtype: str, bucket_bytes: int, timeout_s: float):
        from transformers import AutoModelForCausalLM

        from weight_sync.buckets import plan_buckets
        from weight_sync.sources import ModuleSource

        self.timeout_s = timeout_s
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.requires_grad_(False)
        self.source = ModuleSource(self.model)
        self.params = dict(self.model.named_parameters())
        self.metas = self.source.metas(torch.bfloat16)
        self.plan = plan_buckets(self.metas, bucket_bytes)
        # The raw baseline's payload: every tensor in bf16, back to back, already written.
        self.flat = torch.empty(self.plan.total_bytes, dtype=torch.uint8)
        offset = 0
        for m in self.metas:
            view = self.flat[offset : offset + m.nbytes].view(m.dtype).view(m.shape)
            view.copy_(self.params[m.name])
            offset += m.nbytes
        self.stores: dict[str, tuple] = {}
        self.senders: dict = {}
        self.group = None

    def describe(self) -> dict:
        """Plan, model size and process facts."""
        return {
            "plan": self.plan,
            "metas": self.metas,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
        }

    def host(self, key: str) -> int:
        """Starts a rendezvous store (as ``TrainerActor.host_sync_store``); returns its port."""
        from weight_sync.store import host_store

        store, port, sock = host_store("127.0.0.1", 2, self.timeout_s, key)
        self.stores[key] = (store, sock)
        return port

    def join(self, rdv: Rendezvous) -> None:
        """Joins the benchmark group as rank 0."""
        from weight_sync.collective import new_group

        self.group = new_group(rdv, self.stores[rdv.key][0], 0, torch.device("cpu"))

    def setup_sender(self, kind: str, rdv: Rendezvous) -> None:
        """Builds one of our senders (as ``TrainerActor.setup_sync``), buffers shared."""
        from weight_sync.sender import WeightSender
        from weight_sync.transport import make_sender

        device = torch.device("cpu")
        sender = WeightSender(self.source, self.plan, device)
        shared = next(iter(self.senders.values()), None)
        if shared is not None:
            sender.buffers = shared.buffers  # the same two pre-touched buffers for both kinds
        buffers = sender.allocate_buffers()
        sender.transports.append(make_sender(rdv, self.stores[rdv.key][0], buffers, device))
        self.senders[kind] = sender

    def raw(self) -> dict:
        """One flat broadcast of every byte."""
        _barrier(self.group)
        t0, c0 = time.perf_counter(), time.process_time()
        _broadcast(self.group, self.flat)
        return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    def ours_transfer(self, version: int) -> dict:
        """Our pack + bucketed broadcast to the transfer-only receiver."""
        _barrier(self.group)
        c0 = time.process_time()
        report = self.senders["xfer"].send(version, verify=False)
        return {**_send_summary(report), "cpu_s": time.process_time() - c0}

    def bucketed_no_pack(self) -> dict:
        """Diagnostic: WeightSender's send loop (two buffers in flight) without the pack."""
        sender = self.senders["xfer"]
        (transport,) = sender.transports
        _barrier(self.group)
        t0, c0 = time.perf_counter(), time.process_time()
        in_flight: list = [None, None]
        for bucket in self.plan.buckets:
            slot = bucket.index % 2
            if in_flight[slot] is not None:
                in_flight[slot].wait()
            in_flight[slot] = transport.send(bucket, sender.buffers[slot])
        for op in in_flight:
            if op is not None:
                op.wait()
        return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    def ours_total(self, version: int, verify: bool) -> dict:
        """Our pack + bucketed broadcast to the engine's worker extension."""
        rss = _PeakRss()
        _barrier(self.group)
        c0 = time.process_time()
        report = self.senders["sync"].send(version, verify=verify)
        out = {**_send_summary(report), "cpu_s": time.process_time() - c0}
        out.update(rss.stop())
        if verify:
            out["fingerprints"] = report.fingerprints
        return out

    def per_tensor(self, engine) -> dict:
        """Naive (vLLM's RLHF example): per tensor, an RPC to the engine and a broadcast."""
        _barrier(self.group)
        t0 = time.perf_counter()
        for m in self.metas:
            handle = engine.pt_recv.remote(m.name, m.shape, m.dtype)
            _broadcast(self.group, self.params[m.name].detach().to(m.dtype).contiguous())
            ray.get(handle, timeout=self.timeout_s)
        end = ray.get(engine.pt_end.remote(), timeout=self.timeout_s)
        return {"seconds": time.perf_counter() - t0, "engine": end}


def _send_summary(report) -> dict:
    return {
        "seconds": report.seconds,
        "pack_s": report.pack_s,
        "wait_s": report.wait_s,
        "bytes": report.bytes_sent,
    }


# ----- the driver -------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each kind (>= 3)")
    p.add_argument(
        "--inner",
        type=int,
        default=3,
        help="rounds of the cheap transfer-only kinds (raw_flat, bucketed_no_pack, "
        "ours_transfer) alternated within each repeat",
    )
    p.add_argument(
        "--bucket-mib",
        type=float,
        default=default_bucket_bytes("cpu") / (1 << 20),
        help="bucket size in MiB (default: the CPU default of weight_sync)",
    )
    p.add_argument(
        "--sender-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype the sender holds its weights in (the trainer's fp32 by default: packing casts)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="bound on every wait (s)")
    p.add_argument("--verbose", action="store_true", help="show the actors' logs")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be >= 3")
    if args.inner < 1:
        p.error("--inner must be >= 1")
    return args


def _extra(side: dict) -> int:
    # Clamped at 0: the kernel updates the high-water mark lazily, so a few KiB of RSS that
    # came and went between the reset and the first read can leave it just below that read.
    return max(0, side["rss_peak"] - side["rss_before"])


def _median(samples: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def _verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    out = Path(args.json).resolve() if args.json else None
    if os.path.realpath(os.getcwd()) == _HERE:
        os.chdir(os.path.dirname(_HERE))  # Ray puts the driver's cwd on the workers' path too
    bucket_bytes = int(args.bucket_mib * (1 << 20))
    model_dir = str(build_tiny_model(MODEL_SPEC))
    ray.init(
        address="local",  # a fresh local Ray, never another job's cluster on this machine
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=args.verbose,
    )
    try:
        results = _run(args, model_dir, bucket_bytes, started, loadavg_start)
    finally:
        ray.shutdown()
    print_table(results)
    if out is not None:
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    return results


def _run(args, model_dir: str, bucket_bytes: int, started: float, loadavg_start) -> dict:
    from weight_sync.fingerprint import compare
    from weight_sync.receiver import ReceiverSetup, SyncRequest
    from weight_sync.verify import check_applied

    timeout = args.timeout
    engine = (
        ray.remote(BenchEngine)
        .options(num_gpus=0.5, num_cpus=0.1)
        .remote(
            EngineConfig(model=model_dir, kv_cache_bytes=64 << 20, max_model_len=256),
            "engine0",
            (0,),
            {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        )
    )
    sender = (
        ray.remote(BenchSender)
        .options(num_cpus=0.1)
        .remote(model_dir, args.sender_dtype, bucket_bytes, timeout)
    )
    t0 = time.perf_counter()
    _, info = ray.get([engine.start.remote(("bench", 0)), sender.describe.remote()], timeout=600)
    startup_s = time.perf_counter() - t0
    plan, metas = info["plan"], info["metas"]
    greedy = Sampling(n=1, max_tokens=16, temperature=0.0)
    tokens_loaded = [
        c.token_ids for c in ray.get(engine.generate.remote(PROMPTS, greedy), timeout=timeout)
    ]

    # One store and one group per measurement kind: benchmark (raw, per-tensor, barriers),
    # ours_total (the engine's worker extension), ours_transfer (transfer-only receiver).
    run_key = f"wsbench-{uuid.uuid4().hex[:8]}"
    rdv = {}
    for kind in ("bench", "sync", "xfer"):
        key = f"{run_key}-{kind}"
        port = ray.get(sender.host.remote(key), timeout=timeout)
        rdv[kind] = Rendezvous("127.0.0.1", port, 2, key, timeout, Backend.GLOO)
    engine_info, _ = ray.get(
        [
            engine.bench_join.remote(rdv["bench"], metas, plan.total_bytes),
            sender.join.remote(rdv["bench"]),
        ],
        timeout=timeout,
    )
    setup = ReceiverSetup((rdv["sync"],), (1,), plan)
    ray.get(
        [engine.setup_sync.remote(setup), sender.setup_sender.remote("sync", rdv["sync"])],
        timeout=timeout,
    )
    ray.get(
        [
            engine.bench_setup_xfer.remote(rdv["xfer"], plan),
            sender.setup_sender.remote("xfer", rdv["xfer"]),
        ],
        timeout=timeout,
    )

    version = 0

    verified = []  # fingerprint comparisons that passed

    def measure(kind: str, rep: int) -> dict:
        nonlocal version
        version += 1
        t = time.perf_counter()
        if kind == "raw_flat":
            s, e = ray.get([sender.raw.remote(), engine.bench_raw.remote()], timeout=timeout)
        elif kind == "bucketed_no_pack":
            s, e = ray.get(
                [sender.bucketed_no_pack.remote(), engine.bench_transfer.remote()],
                timeout=timeout,
            )
        elif kind == "ours_transfer":
            s, e = ray.get(
                [sender.ours_transfer.remote(version), engine.bench_transfer.remote()],
                timeout=timeout,
            )
        elif kind in ("ours_total", "ours_total_verified"):
            verify = kind == "ours_total_verified"
            request = SyncRequest(version=version, verify=verify)
            s, e = ray.get(
                [
                    sender.ours_total.remote(version, verify),
                    engine.bench_total.remote(request, ("bench", rep)),
                ],
                timeout=timeout,
            )
        else:
            e, s = ray.get(
                [engine.pt_begin.remote(), sender.per_tensor.remote(engine)], timeout=timeout
            )
            e = s.pop("engine")
        wall = time.perf_counter() - t
        if "fingerprints" in s:
            sent = s.pop("fingerprints")
            got = e["report"].fingerprints
            compare(sent, got, where=f"engine0 worker tp0 (version {version})")
            verified.append((sent, len(got)))
        return {"seconds": e["seconds"], "driver_wall_s": wall, "sender": s, "receiver": e}

    # Warm-up (not counted): one of each, in the order of a repeat.
    order = (*CHEAP_KINDS, *FULL_KINDS)
    warmup = {}
    for kind in order:
        warmup[kind] = measure(kind, 0)
        if kind == "ours_total_verified":
            sent = verified[-1][0]
            applied_after_ours = check_applied(
                sent,
                ray.get(engine.applied_fingerprints.remote(), timeout=timeout),
                DEFAULT_FUSED_GROUPS,
                where="engine0 after ours_total_verified",
            )

    samples: dict[str, list[dict]] = {k: [] for k in order}
    paired = []  # ours_transfer / raw_flat of adjacent samples (same load conditions)
    for rep in range(1, args.repeats + 1):
        schedule = [*CHEAP_KINDS * args.inner, *FULL_KINDS]
        for kind in schedule:
            samples[kind].append(measure(kind, rep))
            print(f"  repeat {rep} {kind:16s} {samples[kind][-1]['seconds']:.4f} s", flush=True)
            if kind == "ours_transfer":
                paired.append(samples[kind][-1]["seconds"] / samples["raw_flat"][-1]["seconds"])

    # The last kind run was per_tensor: its applied weights must equal what was sent, too.
    applied_after_per_tensor = check_applied(
        sent,
        ray.get(engine.applied_fingerprints.remote(), timeout=timeout),
        DEFAULT_FUSED_GROUPS,
        where="engine0 after per_tensor",
    )
    tokens_synced = [
        c.token_ids for c in ray.get(engine.generate.remote(PROMPTS, greedy), timeout=timeout)
    ]
    results = _summarise(args, samples, plan, metas, model_dir, bucket_bytes, info, engine_info)
    results["diagnostics"]["transfer_vs_raw_paired_median"] = statistics.median(paired)
    first = warmup["ours_total"]  # the first sync of this engine: cold allocator caches
    results["peak_rss_extra_bytes_first_sync"] = {
        side: _extra(first[side]) for side in ("sender", "receiver")
    }
    results["validation"] = {
        "fingerprints_compared_per_sync": verified[-1][1],
        "verified_syncs": len(verified),
        "fingerprints_match": True,  # compare() raises otherwise
        "applied_params_checked_after_ours_total": applied_after_ours,
        "applied_params_checked_after_per_tensor": applied_after_per_tensor,
        "greedy_tokens_equal_checkpoint_engine": tokens_synced == tokens_loaded,
    }
    results["warmup_s"] = {k: v["seconds"] for k, v in warmup.items()}
    results["engine_startup_s"] = startup_s
    results["machine"]["loadavg_start"] = loadavg_start
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["runtime_s"] = time.perf_counter() - started
    return results


def _summarise(args, samples, plan, metas, model_dir, bucket_bytes, info, engine_info) -> dict:
    med = {k: _median(v, "seconds") for k, v in samples.items()}
    totals = samples["ours_total"]
    rss = {
        side: statistics.median(_extra(s[side]) for s in totals) for side in ("sender", "receiver")
    }
    buffer_bytes = plan.max_bucket_bytes
    transfer_vs_raw = med["ours_transfer"] / med["raw_flat"]
    speedup = med["per_tensor"] / med["ours_total"]
    rss_ratio = {side: v / buffer_bytes for side, v in rss.items()}
    rss_max = {side: max(_extra(s[side]) for s in totals) for side in ("sender", "receiver")}
    verdicts = {
        "transfer_vs_raw": _verdict(transfer_vs_raw, TARGETS["transfer_vs_raw"], False),
        "speedup_vs_per_tensor": _verdict(speedup, TARGETS["speedup_vs_per_tensor"], True),
        "rss_extra_over_bucket.sender": _verdict(
            rss_ratio["sender"], TARGETS["rss_extra_over_bucket"], False
        ),
        "rss_extra_over_bucket.receiver": _verdict(
            rss_ratio["receiver"], TARGETS["rss_extra_over_bucket"], False
        ),
    }

    def med_of(kind: str, side: str, key: str) -> float:
        return statistics.median(s[side][key] for s in samples[kind])

    breakdown = {
        "ours_transfer": {
            "sender_pack_s": med_of("ours_transfer", "sender", "pack_s"),
            "sender_wait_s": med_of("ours_transfer", "sender", "wait_s"),
            "sender_seconds": med_of("ours_transfer", "sender", "seconds"),
            "receiver_wait_s": med_of("ours_transfer", "receiver", "wait_s"),
        },
        "ours_total": {
            "sender_pack_s": med_of("ours_total", "sender", "pack_s"),
            "sender_wait_s": med_of("ours_total", "sender", "wait_s"),
            "sender_seconds": med_of("ours_total", "sender", "seconds"),
            "receiver_ws_receive_s": statistics.median(
                s["receiver"]["report"].seconds for s in totals
            ),
            "receiver_wait_s": statistics.median(s["receiver"]["report"].wait_s for s in totals),
            "receiver_apply_s": statistics.median(s["receiver"]["report"].apply_s for s in totals),
        },
        "per_tensor": {
            "reload_weights_calls": samples["per_tensor"][0]["receiver"]["reloads"],
            "sender_seconds": med_of("per_tensor", "sender", "seconds"),
        },
        # Process CPU time (all threads, incl. gloo's) while each kind ran: on 2 cores the
        # transfer itself keeps both busy (loopback TCP copies on both sides).
        "cpu_seconds": {
            kind: {side: med_of(kind, side, "cpu_s") for side in ("sender", "receiver")}
            for kind in (*CHEAP_KINDS, "ours_total", "ours_total_verified")
        },
    }

    def slim(s: dict) -> dict:
        out = {"seconds": s["seconds"], "driver_wall_s": s["driver_wall_s"]}
        for side in ("sender", "receiver"):
            out[side] = {
                k: v for k, v in s[side].items() if isinstance(v, (int, float)) and k != "report"
            }
        report = s["receiver"].get("report")
        if report is not None:
            out["receiver"].update(
                ws_receive_s=report.seconds, wait_s=report.wait_s, apply_s=report.apply_s
            )
        return out

    total_bytes = plan.total_bytes
    return {
        "benchmark": "weight_sync",
        "device": "cpu",
        "backend": "gloo",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "sender_torch_threads": info["torch_threads"],
            "engine_torch_threads": engine_info["torch_threads"],
        },
        "model": {
            "dir": model_dir,
            "spec": {k: getattr(MODEL_SPEC, k) for k in MODEL_SPEC.__dataclass_fields__},
            "tensors": len(metas),
            "bytes": total_bytes,
            "mib": total_bytes / (1 << 20),
            "engine_dtype": "bfloat16",
            "sender_dtype": args.sender_dtype,
            "fused_groups": len({fused_group_key(m.name, DEFAULT_FUSED_GROUPS) for m in metas}),
        },
        "bucket_bytes": bucket_bytes,
        "max_bucket_bytes": buffer_bytes,
        "buckets": len(plan.buckets),
        "bytes_on_wire_ours": sum(b.nbytes for b in plan.buckets),
        "timer": TIMER,
        "timed_ours_total_verify": False,
        "repeats": args.repeats,
        "kinds": list(KINDS),
        "diagnostic_kinds": list(DIAG_KINDS),
        "inner_rounds": args.inner,
        "order_within_repeat": [*CHEAP_KINDS * args.inner, *FULL_KINDS],
        "samples_per_kind": {k: len(v) for k, v in samples.items()},
        "raw_flat_s": med["raw_flat"],
        "ours_transfer_s": med["ours_transfer"],
        "ours_total_s": med["ours_total"],
        "per_tensor_total_s": med["per_tensor"],
        "diagnostics": {
            "ours_total_verified_s": med["ours_total_verified"],
            "ours_total_verified_vs_ours_total": med["ours_total_verified"] / med["ours_total"],
            "bucketed_no_pack_s": med["bucketed_no_pack"],
            "bucketed_no_pack_vs_raw": med["bucketed_no_pack"] / med["raw_flat"],
            "what": "our bucketed broadcast of already-packed buffers (no cast/pack), same "
            "receiver as ours_transfer: bucketing cost alone",
        },
        "driver_wall_median_s": {k: _median(v, "driver_wall_s") for k, v in samples.items()},
        "peak_rss_extra_bytes": rss,
        "peak_rss_extra_bytes_per_repeat": {
            side: [_extra(s[side]) for s in totals] for side in ("sender", "receiver")
        },
        "rss_method": RSS_METHOD,
        "rss_method_used": {side: totals[0][side]["rss_method"] for side in ("sender", "receiver")},
        "rss_ratio_denominator": "max_bucket_bytes (the size of each of the two transfer buffers)",
        "transfer_vs_raw": transfer_vs_raw,
        "speedup_vs_per_tensor": speedup,
        "rss_extra_over_bucket": rss_ratio,
        "peak_rss_extra_bytes_max": rss_max,
        "rss_extra_over_bucket_max": {side: v / buffer_bytes for side, v in rss_max.items()},
        "targets": TARGETS,
        "verdicts": verdicts,
        "breakdown_medians": breakdown,
        "samples": {k: [slim(s) for s in v] for k, v in samples.items()},
    }


def print_table(r: dict) -> None:
    m = r["model"]
    print()
    print(
        f"weight sync, CPU/gloo, {r['machine']['cpu_count']} CPUs: {m['tensors']} tensors, "
        f"{m['bytes'] / 1e6:.1f} MB bf16 (sender holds {m['sender_dtype']}), "
        f"{r['buckets']} buckets of <= {r['bucket_bytes'] / (1 << 20):g} MiB, "
        f"medians of {r['repeats']} alternating repeats (transfer-only kinds: "
        f"{r['inner_rounds']} rounds per repeat)"
    )
    rows = [
        ("raw_flat_s", f"{r['raw_flat_s']:.4f}", "", ""),
        ("ours_transfer_s", f"{r['ours_transfer_s']:.4f}", "", ""),
        ("ours_total_s", f"{r['ours_total_s']:.4f}", "", ""),
        ("per_tensor_total_s", f"{r['per_tensor_total_s']:.4f}", "", ""),
        (
            "diag: ours_total_verified_s",
            f"{r['diagnostics']['ours_total_verified_s']:.4f}",
            "",
            "info",
        ),
        (
            "diag: bucketed_no_pack_s",
            f"{r['diagnostics']['bucketed_no_pack_s']:.4f}",
            "",
            "info",
        ),
        (
            "diag: transfer_vs_raw, paired",
            f"{r['diagnostics']['transfer_vs_raw_paired_median']:.3f}",
            "",
            "info",
        ),
        (
            "transfer_vs_raw",
            f"{r['transfer_vs_raw']:.3f}",
            f"<= {TARGETS['transfer_vs_raw']}",
            r["verdicts"]["transfer_vs_raw"],
        ),
        (
            "speedup_vs_per_tensor",
            f"{r['speedup_vs_per_tensor']:.2f}",
            f">= {TARGETS['speedup_vs_per_tensor']}",
            r["verdicts"]["speedup_vs_per_tensor"],
        ),
    ]
    for side in ("sender", "receiver"):
        extra = r["peak_rss_extra_bytes"][side]
        rows.append((f"peak_rss_extra[{side}] MiB", f"{extra / (1 << 20):.1f}", "", ""))
        rows.append(
            (
                f"rss_extra_over_bucket[{side}]",
                f"{r['rss_extra_over_bucket'][side]:.3f}",
                f"<= {TARGETS['rss_extra_over_bucket']}",
                r["verdicts"][f"rss_extra_over_bucket.{side}"],
            )
        )
    mib = 1 << 20
    for label, key in (
        ("worst repeat", "peak_rss_extra_bytes_max"),
        ("first sync", "peak_rss_extra_bytes_first_sync"),
    ):
        extra = r[key]
        rows.append(
            (
                f"peak_rss_extra {label} MiB (snd/rcv)",
                f"{extra['sender'] / mib:.1f}/{extra['receiver'] / mib:.1f}",
                "",
                "info",
            )
        )
    width = max(len(n) for n, *_ in rows)
    print(f"{'metric':<{width}}  {'value':>10}  {'target':>8}  verdict")
    for name, value, target, verdict in rows:
        print(f"{name:<{width}}  {value:>10}  {target:>8}  {verdict}".rstrip())
    b = r["breakdown_medians"]["ours_transfer"]
    print(
        f"ours_transfer breakdown (medians): sender pack {b['sender_pack_s']:.4f} s, sender wait "
        f"{b['sender_wait_s']:.4f} s, sender total {b['sender_seconds']:.4f} s"
    )
    cpu = r["breakdown_medians"]["cpu_seconds"]
    print(
        "process CPU seconds (sender + receiver, medians): "
        + ", ".join(f"{k} {v['sender']:.3f} + {v['receiver']:.3f}" for k, v in cpu.items())
    )
    b = r["breakdown_medians"]["ours_total"]
    print(
        f"ours_total breakdown (medians): sender pack {b['sender_pack_s']:.4f} s, sender wait "
        f"{b['sender_wait_s']:.4f} s; receiver ws_receive {b['receiver_ws_receive_s']:.4f} s = "
        f"wait {b['receiver_wait_s']:.4f} s + apply {b['receiver_apply_s']:.4f} s"
    )
    v = r["validation"]
    print(
        f"validation: {v['fingerprints_compared_per_sync']} fingerprints match in each of "
        f"{v['verified_syncs']} verified syncs; applied params checked "
        f"{v['applied_params_checked_after_ours_total']} (ours) / "
        f"{v['applied_params_checked_after_per_tensor']} (per-tensor); greedy tokens equal the "
        f"checkpoint engine's: {v['greedy_tokens_equal_checkpoint_engine']}"
    )
    la, lb = r["machine"]["loadavg_start"], r["machine"]["loadavg_end"]
    print(f"load average (1 min) at start / end: {la[0]:.2f} / {lb[0]:.2f}")
    print(f"timer: {r['timer']}")
    print(f"runtime: {r['runtime_s']:.1f} s")


if __name__ == "__main__":
    main()
