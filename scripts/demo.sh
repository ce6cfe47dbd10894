#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs the main demo: colocated GRPO on a tiny local model.
# Extra arguments go to the example, e.g. `scripts/demo.sh --steps 10 --out runs/x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
exec .venv/bin/python examples/grpo_colocated.py "$@"
