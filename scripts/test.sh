#!/usr/bin/env bash
# Sets up .venv (idempotent), lints, and runs the test suite. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m slow` for the long soak, or `scripts/test.sh tests/placement`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check . >/dev/null || { .venv/bin/python -m ruff format --diff . | head -50; exit 1; }
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec .venv/bin/python -m pytest "$@"
