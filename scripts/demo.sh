#!/usr/bin/env bash
# Sets up .venv (idempotent), writes the toy task's dataset and runs the main demo through the
# runner: colocated GRPO on a tiny local model, from examples/configs/grpo_toy.yaml.
# Extra arguments are recipe overrides, e.g. `scripts/demo.sh steps=10 out=runs/x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
.venv/bin/python -m colocate.testing.toy_task runs/toy-data >/dev/null
exec .venv/bin/colocate-rl train --config examples/configs/grpo_toy.yaml "$@"
