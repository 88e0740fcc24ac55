#!/usr/bin/env bash
# Creates .venv (seeing the system's packages, so a GPU host's own torch is used) and installs the
# project with its test dependencies. Safe to run again. Usage: source tools/setup-env.sh
set -e
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv --system-site-packages .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # The CPU wheel of torch 2.13 (on disk on the project's machines; CUDA builds elsewhere come from PyPI).
  pip install -q "torch==2.13.0" || pip install -q torch
fi
pip install -q -e ".[test,serve]" -e client
set +e
