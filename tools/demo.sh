#!/usr/bin/env bash
# The main job: sets up .venv if needed, then generates greedily from the tiny synthetic DeepSeek-V4
# (created on first use) through the reference model, on the GPU when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup-env.sh
exec python -m backend.generate "$@"
