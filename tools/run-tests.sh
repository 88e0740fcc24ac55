#!/usr/bin/env bash
# The test command: sets up .venv if needed and runs the whole suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup-env.sh
exec python -m pytest -q "$@"
