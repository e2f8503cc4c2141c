#!/usr/bin/env bash
# Create .venv (if needed) and install fedembed into it. torch 2.13.0 (CPU) goes in first,
# so nothing later can pull a multi-GB CUDA build. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEDEMBED_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "fedembed: creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fedembed-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
