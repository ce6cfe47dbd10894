#!/usr/bin/env bash
# Runs the CUDA-only checks on a single-GPU machine that has CUDA torch (no Ray, vLLM or
# DeepSpeed needed) and prints a summary table with the card's name. At most 460 s (the
# timeouts below); 94 s on an H200.
#   tests/gpu/run_device_checks.sh [RESULTS_JSON]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
results="${1:-${OUT:-/tmp}/gpu-results.json}"
rm -f "$results"
py="${PYTHON:-python3}"
card=$("$py" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo "no CUDA")
echo "device: $card; torch $("$py" -c 'import torch; print(torch.__version__)')"
export GPU_RESULTS="$results" PYTHONPATH="$PWD:${PYTHONPATH:-}"
checks=(-p no:cacheprovider -c /dev/null --rootdir . -m gpu -o markers="gpu: cuda" -s -rs)
ds=tests/gpu/test_cuda_checks.py::test_deepspeed_offload_states_moves_training_tensors_off_gpu_and_restores_them_bit_exact
timeout 200 "$py" -m pytest -q "${checks[@]}" --timeout 180 --deselect "$ds" tests/gpu
rc=$?
# DeepSpeed's offload, each in a fresh process (a clean baseline): with the default CUDA
# allocator, and with expandable segments (which lets empty_cache return partly used segments).
timeout 100 "$py" -m pytest -q "${checks[@]}" --timeout 90 "$ds" || rc=1
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True GPU_CHECK_TAG=_expandable \
  timeout 100 "$py" -m pytest -q "${checks[@]}" --timeout 90 "$ds" || rc=1
timeout 60 "$py" tests/gpu/memory_breakdown.py "$(dirname "$results")/memory-breakdown.json" || rc=1
"$py" - "$results" "$card" <<'PY'
import json, sys
path, card = sys.argv[1], sys.argv[2]
try:
    data = json.load(open(path))
except FileNotFoundError:
    data = {}
ipc = data.get("cuda_ipc", {})
rows = [
    ("CUDA IPC vs D2D copy, 512 MiB buckets", ipc.get("throughput_vs_d2d"), 0.5),
]
for run in ipc.get("runs", []):
    kind = "pack+send, 2 buffers" if run["pipeline"] else "transport"
    name = f"  IPC {run['bucket_bytes'] >> 20} MiB buckets, {kind}"
    rows.append((name, run["throughput_vs_d2d"], None))
    rows.append(("    bit-exact", float(run["bit_exact"]), 1.0))
torch_off = data.get("torch_offload", {})
ds_off = data.get("deepspeed_offload", {})
ds_exp = data.get("deepspeed_offload_expandable", {})
rows += [
    ("torch offload: share of training memory freed", torch_off.get("freed_fraction"), 0.9),
    ("  params and Adam states identical after reload",
     None if not torch_off else float(torch_off["params_identical_after_reload"]
                                      and torch_off["adam_states_identical_after_reload"]), 1.0),
    ("DeepSpeed offload_states: share freed", ds_off.get("freed_fraction"), 0.9),
    ("  share freed keeping bf16 params (TRAIN->SYNC)", ds_off.get("freed_fraction_keep_params"),
     None),
    ("  bf16 + fp32 master identical after reload",
     None if not ds_off else float(ds_off["bf16_partitions_identical_after_reload"]
                                   and ds_off["fp32_master_identical_after_reload"]), 1.0),
    ("  share of torch's allocator returned", ds_off.get("allocator_freed_fraction"), None),
    ("DeepSpeed offload_states, expandable segments", ds_exp.get("freed_fraction"), 0.9),
    ("  share of torch's allocator returned", ds_exp.get("allocator_freed_fraction"), 0.9),
    ("  share freed keeping bf16 params (TRAIN->SYNC)", ds_exp.get("freed_fraction_keep_params"),
     None),
    ("bucket pack vs one flat cast-copy", data.get("bucket_pack", {}).get("pack_vs_plain"), 0.5),
    ("  first pack, building the views",
     data.get("bucket_pack", {}).get("pack_building_views_vs_plain"), None),
]
print(f"\n{card}")
print(f"{'check':48} {'measured':>9} {'target':>7}  verdict")
for name, value, target in rows:
    shown = "-" if value is None else f"{value:.3f}"
    if value is None:
        verdict = "not run"
    elif target is None:
        verdict = "(measured)"
    else:
        verdict = "PASS" if value >= target else "MISS"
    print(f"{name:48} {shown:>9} {'' if target is None else target:>7}  {verdict}")
PY
exit $rc
