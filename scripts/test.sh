#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite on this host.
# Tests that need a GPU or AMX are marked and skipped here with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
