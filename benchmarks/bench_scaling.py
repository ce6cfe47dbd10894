"""Sync time and memory, and trainer start-up memory, against model size (CPU, gloo, bf16 engine).

Llama-family models built locally from ~50M to ~1B parameters. For each size:

- sync: one coordinator on separate pools (one trainer rank on logical GPU 0, one vLLM engine
  on GPU 1), ``--repeats`` verified syncs. The sender is the default trainer (DeepSpeed ZeRO-3,
  fp32) up to ``--zero3-max-params`` (a world-1 ZeRO-3 rank holds ~20 bytes a parameter in
  fp32, more than this machine has beside the engine at 1B), above it the plain-torch backend
  (``sender`` says which, per size). ``sync_s`` is the median driver wall time of
  ``Coordinator.sync()``: the whole verified sync (transfer, apply, both sides' fingerprints
  compared, the engine's applied-weight check), as a user waits for it; ``sync_s_receiver`` is
  the median of ``SyncReport.seconds`` (the engine workers' receive + apply only), split into
  ``receiver_wait_s`` (waiting for buckets) and ``receiver_apply_s`` (vLLM's layer-wise reload,
  the CPU repacking, the fingerprints of what arrived); ``sender_gather_s`` and
  ``sender_pack_s`` are the sender's ZeRO-3 gathers and its packing into buckets.
- raw: in the same coordinator's two actors, a gloo broadcast of the same number of bytes as
  one uint8 tensor into a pre-touched buffer, timed in the engine after a barrier (the
  transport's limit, as in ``bench_weight_sync.py``), median of ``--repeats``;
  ``ours_vs_raw`` = ``sync_s / raw_s``. The sender's and the
  receiver's extra peak RSS over the last sync come from ``PeakRss`` inside each actor (VmHWM
  reset just before it), run there with ``__ray_call__``. Then ``Coordinator.export_hf`` (one
  chunk of the bucket size gathered, cast and written at a time): the trainer's extra peak
  RSS over it is ``export_extra_rss``.
- start: DeepSpeed ZeRO-3 trainer ranks (``TrainerActor``) started at world size 1, then 2;
  each rank's peak RSS after ``start`` (``status()["peak_rss_bytes"]``). Null above
  ``--start-max-params`` (a world-size-1 trainer with Adam needs ~16 bytes a parameter).

Then ``sync_s = fixed_s + seconds_per_gib x GiB`` by least squares, with its ``r2``, and both
curves in ``docs/scaling.png``. Linearity is judged by the cost per GiB at each size:
``per_gib_largest_over_smallest`` (sync s/GiB at the largest size over the smallest; an x^1.5
law gives 4.4 over these sizes while its r2 passes) and a fixed cost that is not negative.
Targets: ``ours_vs_raw <= 1.3`` at every size, ``per_gib_largest_over_smallest <= 1.2``,
``fixed_s >= 0``, ``r2 >= 0.95``; extra RSS (sync and export) <= 3 buckets at every size;
``start_rss_world2 <= 0.6 x start_rss_world1`` at the largest size with both.

Run: ``.venv/bin/python benchmarks/bench_scaling.py --json out.json`` (minutes; not a test).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
from common import (
    PeakRss,
    broadcast,
    code_version,
    gloo_group,
    machine,
    median,
    timed,
    verdict,
    write_json,
)

from colocate import (
    ActorId,
    Coordinator,
    EngineConfig,
    SyncConfig,
    TinyModelSpec,
    TrainerConfig,
    build_tiny_model,
    lm_loss,
)
from colocate.actors.trainer import TrainerActor
from colocate.core.contract import Seat
from colocate.operations.cluster import connect
from placement import TenantKind, TopologySpec
from weight_sync import Backend, Rendezvous

# (hidden, intermediate, layers, heads): 53M, 191M, 567M, 1.01B parameters (vocabulary ~1k).
SIZES = ((768, 2048, 8, 12), (1024, 4096, 12, 16), (1536, 6144, 16, 24), (2048, 8192, 16, 32))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--repeats", type=int, default=3, help="syncs per size (median)")
    p.add_argument("--sizes", type=int, default=len(SIZES), help="how many of the sizes")
    p.add_argument("--start-max-params", type=float, default=6e8)
    p.add_argument(
        "--zero3-max-params",
        type=float,
        default=6e8,
        help="largest model synced from a ZeRO-3 sender; above it the plain-torch backend",
    )
    p.add_argument("--bucket-mib", type=float, default=32.0)
    p.add_argument("--png", default="docs/scaling.png")
    p.add_argument("--timeout", type=float, default=900.0, help="bound on every wait (s)")
    return p.parse_args(argv)


def _spec(hidden, inter, layers, heads) -> TinyModelSpec:
    return TinyModelSpec(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        vocab_size=1024,
    )


def _peak_start(actor) -> None:
    actor._bench_peak = PeakRss()


def _peak_stop(actor) -> int:
    reading = actor._bench_peak.stop()
    return max(0, reading["rss_peak"] - reading["rss_before"])


def _raw_host(actor, key: str, timeout: float) -> int:
    """In the trainer: the raw baseline's store (rank 0); its port."""
    from weight_sync.store import host_store

    store, port, sock = host_store("127.0.0.1", 2, timeout, key)
    actor._bench_raw_store = (store, sock)
    return port


def _raw_join(actor, rdv: Rendezvous, rank: int, nbytes: int) -> None:
    """In either actor: joins the raw baseline's gloo group; a pre-touched buffer of nbytes."""
    import torch

    from weight_sync.store import join_store

    if rank == 0:
        store = actor._bench_raw_store[0]
    else:
        store = join_store(rdv.host, rdv.port, 2, rdv.timeout_s, rdv.key)
    actor._bench_raw = (gloo_group(rdv, store, rank), torch.ones(nbytes, dtype=torch.uint8))


def _raw_broadcast(actor) -> float:
    """One timed broadcast of the buffer from rank 0 (seconds, after a barrier)."""
    group, flat = actor._bench_raw
    return timed(group, lambda: broadcast(group, flat))["seconds"]


def _raw_close(actor) -> None:
    actor._bench_raw = None
    actor._bench_raw_store = None


def measure_raw(handles: list, nbytes: int, repeats: int, timeout: float) -> list[float]:
    """The raw flat broadcast between the trainer (rank 0) and the engine: receiver seconds."""
    trainer, engine = handles
    key = f"scaling-raw-{nbytes}"
    port = ray.get(trainer.__ray_call__.remote(_raw_host, key, timeout), timeout=timeout)
    rdv = Rendezvous("127.0.0.1", port, 2, key, timeout, Backend.GLOO)
    ray.get(
        [h.__ray_call__.remote(_raw_join, rdv, rank, nbytes) for rank, h in enumerate(handles)],
        timeout=timeout,
    )
    seconds = []
    for _ in range(repeats + 1):  # the first one warms the group up
        _, received = ray.get(
            [h.__ray_call__.remote(_raw_broadcast) for h in handles], timeout=timeout
        )
        seconds.append(received)
    ray.get([h.__ray_call__.remote(_raw_close) for h in handles], timeout=timeout)
    return seconds[1:]


def measure_sync(model: str, params: int, args) -> dict:
    bucket = int(args.bucket_mib * 2**20)
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=1, engines=1, colocate=False)
    zero3 = params <= args.zero3_max_params
    with Coordinator(
        spec,
        EngineConfig(model=model, kv_cache_bytes=16 << 20, max_model_len=128),
        TrainerConfig(model=model) if zero3 else TrainerConfig(model=model, deepspeed=False),
        lm_loss,
        sync=SyncConfig(bucket_bytes=bucket, timeout_s=args.timeout),
    ) as coord:
        handles = [
            coord.fleet.handle(ActorId(k, 0)) for k in (TenantKind.TRAINER, TenantKind.ENGINE)
        ]
        seconds, walls, reports = [], [], []
        for i in range(args.repeats + 1):  # the first sync is a warm-up
            last = i == args.repeats
            if last:
                ray.get([h.__ray_call__.remote(_peak_start) for h in handles], timeout=60)
            t = time.perf_counter()
            report = coord.sync()
            if i:
                walls.append(time.perf_counter() - t)
                seconds.append(report.seconds)
                reports.append(report)
            if last:
                sender, receiver = ray.get(
                    [h.__ray_call__.remote(_peak_stop) for h in handles], timeout=60
                )
        ray.get(handles[0].__ray_call__.remote(_peak_start), timeout=60)
        with tempfile.TemporaryDirectory(prefix="scaling-export-") as out:
            coord.export_hf(out)
        exported = ray.get(handles[0].__ray_call__.remote(_peak_stop), timeout=60)
        plan = coord.bucket_plan
        raw = measure_raw(handles, plan.total_bytes, args.repeats, args.timeout)
        return {
            "export_extra_rss": exported,
            "bytes": plan.total_bytes,
            "sender": "DeepSpeed ZeRO-3 (fp32, world 1)" if zero3 else "plain torch (fp32)",
            "sync_s": median(walls),
            "sync_s_all": walls,
            "sync_s_receiver": median(seconds),
            # Where the receiver's time goes (engine worker 0, medians over the repeats):
            # waiting for buckets on the wire, and applying them (vLLM's layer-wise reload,
            # the CPU repacking of linear layers, the fingerprints of what arrived).
            "receiver_wait_s": median([r.receivers[0][0]["wait_s"] for r in reports]),
            "receiver_apply_s": median([r.receivers[0][0]["apply_s"] for r in reports]),
            "sender_gather_s": median([r.sender["gather_s"] for r in reports]),
            "sender_pack_s": median([r.sender["pack_s"] for r in reports]),
            "raw_s": median(raw),
            "raw_s_all": raw,
            "ours_vs_raw": median(walls) / median(raw),
            "sender_extra_rss": sender,
            "receiver_extra_rss": receiver,
            "bucket_bytes": plan.max_bucket_bytes,
            "verified_tensors": report.verified_tensors,
        }


def count_params(model: str) -> int:
    """Parameters of the model directory's architecture (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sum(p.numel() for p in meta.parameters())


def measure_start(model: str, world: int, timeout: float) -> dict:
    cls = ray.remote(TrainerActor).options(num_gpus=0.5, num_cpus=0.1)
    config = TrainerConfig(model=model)
    env = {"DS_ACCELERATOR": "cpu"}
    actors = [cls.remote(Seat("t", r, world, (r,), config, env, lm_loss)) for r in range(world)]
    try:
        master = ray.get(actors[0].host_group_store.remote(False, 60), timeout=60)
        info = ray.get([a.start.remote(master, timeout) for a in actors], timeout=timeout)
        status = ray.get([a.status.remote() for a in actors], timeout=60)
    finally:
        for a in actors:
            ray.kill(a)
    return {
        "peak": max(s["peak_rss_bytes"] for s in status),
        "mode": info[0]["start_mode"],
        "params": info[0]["parameters"],
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares slope, intercept and r2 of ``ys`` on ``xs``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, intercept, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def plot(sizes: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [s["params"] / 1e6 for s in sizes]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(params, [s["sync_s"] for s in sizes], "o-")
    a.set(xlabel="parameters (M)", ylabel="verified sync (s)", title="sync time (CPU, gloo)")
    for key, label in (("start_rss_world1", "world 1"), ("start_rss_world2", "world 2")):
        pts = [(p, s[key] / 2**30) for p, s in zip(params, sizes, strict=True) if s[key]]
        if pts:
            b.plot(*zip(*pts, strict=True), "o-", label=label)
    b.set(xlabel="parameters (M)", ylabel="peak RSS per rank at start (GiB)")
    b.set_title("ZeRO-3 trainer start-up (CPU)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    args = parse_args(argv)
    connect(None, logical_gpus=2)
    sizes = []
    for dims in SIZES[: args.sizes]:
        model = str(build_tiny_model(_spec(*dims)))
        t0 = time.perf_counter()
        params = count_params(model)
        row = measure_sync(model, params, args)
        starts = {
            world: measure_start(model, world, args.timeout)
            if params <= args.start_max_params
            else None
            for world in (1, 2)
        }
        row.update(
            params=params,
            start_rss_world1=starts[1] and starts[1]["peak"],
            start_rss_world2=starts[2] and starts[2]["peak"],
            start_mode=starts[1] and starts[1]["mode"],
            seconds=time.perf_counter() - t0,
        )
        sizes.append(row)
        mib = {k: row[k] / 2**20 for k in ("sender_extra_rss", "receiver_extra_rss")}
        row["seconds_per_gib"] = row["sync_s"] / (row["bytes"] / 2**30)
        print(
            f"{params / 1e6:7.0f}M params ({row['sender']}): verified sync {row['sync_s']:.2f} s, "
            f"raw {row['raw_s']:.2f} s, ours_vs_raw {row['ours_vs_raw']:.2f}, "
            f"{row['seconds_per_gib']:.2f} s/GiB (receiver apply {row['receiver_apply_s']:.2f} s, "
            f"wait {row['receiver_wait_s']:.2f} s); extra RSS sender "
            f"{mib['sender_extra_rss']:.0f} / receiver {mib['receiver_extra_rss']:.0f} MiB, "
            f"start RSS {row['start_rss_world1']} / {row['start_rss_world2']}",
            flush=True,
        )
    gib = [s["bytes"] / 2**30 for s in sizes]
    slope, intercept, r2 = fit(gib, [s["sync_s"] for s in sizes])
    worst = max(
        max(s["sender_extra_rss"], s["receiver_extra_rss"]) / s["bucket_bytes"] for s in sizes
    )
    worst_export = max(s["export_extra_rss"] / s["bucket_bytes"] for s in sizes)
    both = [s for s in sizes if s["start_rss_world1"] and s["start_rss_world2"]]
    ratio = both[-1]["start_rss_world2"] / both[-1]["start_rss_world1"] if both else None
    per_gib = sizes[-1]["seconds_per_gib"] / sizes[0]["seconds_per_gib"]
    worst_vs_raw = max(s["ours_vs_raw"] for s in sizes)
    results = {
        "benchmark": "scaling",
        "device": "cpu",
        "backend": "gloo",
        "machine": machine(),
        "code": code_version(),
        "sizes": sizes,
        "seconds_per_gib": slope,
        "fixed_s": intercept,
        "r2": r2,
        "per_gib_largest_over_smallest": per_gib,
        "worst_ours_vs_raw": worst_vs_raw,
        "ratio_definitions": {
            "ours_vs_raw": "sync_s (driver wall of a verified Coordinator.sync) / raw_s (one "
            "gloo broadcast of the same bytes between the same two actors, receiver-timed)",
            "per_gib_largest_over_smallest": "sync_s/GiB at the largest size / at the smallest",
        },
        "worst_extra_rss_in_buckets": worst,
        "worst_export_extra_rss_in_buckets": worst_export,
        "start_ratio_world2_over_world1": ratio,
        "verdicts": {
            "ours_vs_raw<=1.3": verdict(worst_vs_raw, 1.3, False),
            "per_gib_largest_over_smallest<=1.2": verdict(per_gib, 1.2, False),
            "fixed_s>=0": verdict(intercept, 0.0, True),
            "r2>=0.95": verdict(r2, 0.95, True),
            "extra_rss<=3_buckets": verdict(worst, 3.0, False),
            "export_extra_rss<=3_buckets": verdict(worst_export, 3.0, False),
            "start_world2<=0.6_world1": verdict(ratio, 0.6, False) if ratio else "n/a",
        },
    }
    plot(sizes, args.png)
    print(
        f"seconds_per_gib {slope:.2f}, fixed_s {intercept:.2f}, r2 {r2:.4f}; worst extra RSS "
        f"{worst:.2f} buckets (export {worst_export:.2f}); start world2/world1 {ratio}; "
        f"{results['verdicts']}"
    )
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
