#!/usr/bin/env bash
# Runs the CUDA-only checks on a single-GPU machine that has CUDA torch (no Ray, vLLM or
# DeepSpeed needed) and prints a summary table with the card's name. Budget: < 8 minutes.
#   tests/gpu/run_device_checks.sh [RESULTS_JSON]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
results="${1:-${OUT:-/tmp}/gpu-results.json}"
rm -f "$results"
py="${PYTHON:-python3}"
card=$("$py" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo "no CUDA")
echo "device: $card; torch $("$py" -c 'import torch; print(torch.__version__)')"
GPU_RESULTS="$results" PYTHONPATH="$PWD:${PYTHONPATH:-}" timeout 480 "$py" -m pytest -q \
  -p no:cacheprovider -c /dev/null --rootdir . -m gpu -o markers="gpu: cuda" \
  --timeout 300 tests/gpu
rc=$?
"$py" - "$results" "$card" <<'PY'
import json, sys
path, card = sys.argv[1], sys.argv[2]
try:
    data = json.load(open(path))
except FileNotFoundError:
    data = {}
rows = [
    ("CUDA IPC vs device-to-device copy", data.get("cuda_ipc", {}).get("throughput_vs_d2d"), 0.5),
    ("torch offload: share of training memory freed",
     data.get("torch_offload", {}).get("freed_fraction"), 0.9),
    ("DeepSpeed offload_states: share freed", data.get("deepspeed_offload", {}).get("freed_fraction"), 0.9),
    ("bucket pack vs one flat cast-copy", data.get("bucket_pack", {}).get("pack_vs_plain"), 0.5),
]
print(f"\n{card}")
print(f"{'check':48} {'measured':>9} {'target':>7}  verdict")
for name, value, target in rows:
    shown = "-" if value is None else f"{value:.3f}"
    verdict = "not run" if value is None else ("PASS" if value >= target else "MISS")
    print(f"{name:48} {shown:>9} {target:>7}  {verdict}")
PY
exit $rc
