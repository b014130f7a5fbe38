#!/usr/bin/env bash
# Create .venv (if missing) and install latentsearch with its dev tools.
# torch is pinned to 2.13.0 first so pip takes the CPU wheel instead of a multi-GB CUDA build;
# on a GPU host set LATENTSEARCH_TORCH="torch==2.13.0" from the CUDA index of your choice.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${LATENTSEARCH_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "latentsearch installed in $(pwd)/.venv"
