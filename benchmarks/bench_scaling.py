"""Sync time and memory, and trainer start-up memory, against model size (CPU, gloo, bf16 engine).

Llama-family models built locally from ~50M to ~1B parameters. For each size:

- sync: one coordinator on separate pools (one trainer rank on logical GPU 0, the plain-torch
  backend so that no optimizer state is held; one vLLM engine on GPU 1), ``--repeats``
  verified syncs; ``sync_s`` is the median of ``SyncReport.seconds``. The sender's and the
  receiver's extra peak RSS over the last sync come from ``PeakRss`` inside each actor (VmHWM
  reset just before it), run there with ``__ray_call__``. Then ``Coordinator.export_hf`` (one
  chunk of the bucket size gathered, cast and written at a time): the trainer's extra peak
  RSS over it is ``export_extra_rss``.
- start: DeepSpeed ZeRO-3 trainer ranks (``TrainerActor``) started at world size 1, then 2;
  each rank's peak RSS after ``start`` (``status()["peak_rss_bytes"]``). Null above
  ``--start-max-params`` (a world-size-1 trainer with Adam needs ~16 bytes a parameter).

Then ``sync_s = fixed_s + seconds_per_gib x GiB`` by least squares, with its ``r2``, and both
curves in ``docs/scaling.png``. Targets: ``r2 >= 0.95``; extra RSS (sync and export) <= 3
buckets at every size; ``start_rss_world2 <= 0.6 x start_rss_world1`` at the largest size with both.

Run: ``.venv/bin/python benchmarks/bench_scaling.py --json out.json`` (minutes; not a test).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
from common import PeakRss, code_version, machine, median, verdict, write_json

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
from colocate.cluster import connect
from colocate.trainer import TrainerActor
from placement import TenantKind, TopologySpec

# (hidden, intermediate, layers, heads): 53M, 191M, 567M, 1.01B parameters (vocabulary ~1k).
SIZES = ((768, 2048, 8, 12), (1024, 4096, 12, 16), (1536, 6144, 16, 24), (2048, 8192, 16, 32))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--repeats", type=int, default=3, help="syncs per size (median)")
    p.add_argument("--sizes", type=int, default=len(SIZES), help="how many of the sizes")
    p.add_argument("--start-max-params", type=float, default=6e8)
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


def measure_sync(model: str, args) -> dict:
    bucket = int(args.bucket_mib * 2**20)
    spec = TopologySpec(nodes=1, gpus_per_node=2, trainer_world_size=1, engines=1, colocate=False)
    with Coordinator(
        spec,
        EngineConfig(model=model, kv_cache_bytes=16 << 20, max_model_len=128),
        TrainerConfig(model=model, deepspeed=False),
        lm_loss,
        sync=SyncConfig(bucket_bytes=bucket, timeout_s=args.timeout),
    ) as coord:
        handles = [
            coord.fleet.handle(ActorId(k, 0)) for k in (TenantKind.TRAINER, TenantKind.ENGINE)
        ]
        seconds = []
        for i in range(args.repeats):
            last = i == args.repeats - 1
            if last:
                ray.get([h.__ray_call__.remote(_peak_start) for h in handles], timeout=60)
            report = coord.sync()
            seconds.append(report.seconds)
            if last:
                sender, receiver = ray.get(
                    [h.__ray_call__.remote(_peak_stop) for h in handles], timeout=60
                )
        ray.get(handles[0].__ray_call__.remote(_peak_start), timeout=60)
        with tempfile.TemporaryDirectory(prefix="scaling-export-") as out:
            coord.export_hf(out)
        exported = ray.get(handles[0].__ray_call__.remote(_peak_stop), timeout=60)
        plan = coord.bucket_plan
        return {
            "export_extra_rss": exported,
            "bytes": plan.total_bytes,
            "sync_s": median(seconds),
            "sync_s_all": seconds,
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
    actors = [cls.remote(config, r, world, f"t{r}", r, lm_loss, env) for r in range(world)]
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
        row = measure_sync(model, args)
        params = count_params(model)
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
        print(
            f"{params / 1e6:7.0f}M params: sync {row['sync_s']:.2f} s, extra RSS sender "
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
        "worst_extra_rss_in_buckets": worst,
        "worst_export_extra_rss_in_buckets": worst_export,
        "start_ratio_world2_over_world1": ratio,
        "verdicts": {
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
