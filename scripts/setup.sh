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
# The browser tests (tests/test_explorer_browser.py) drive the system's Chromium through Playwright
# (never a browser Playwright downloads). Install Debian's when none is found and apt-get can run
# (root); LATENTSEARCH_NO_APT=1 skips this. Without a browser those tests skip, saying why.
if [ -z "${LATENTSEARCH_CHROMIUM:-}" ] && [ ! -x /usr/lib/chromium/chromium ] \
        && ! command -v chromium >/dev/null 2>&1 && [ -z "${LATENTSEARCH_NO_APT:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium with apt-get (for the browser tests)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get -qq update && apt-get -qq install -y chromium; } >/dev/null 2>&1 \
            || echo "warning: apt-get could not install chromium; the browser tests will skip" >&2
    else
        echo "note: no Chromium found and apt-get cannot run here; the browser tests will skip" >&2
    fi
fi
echo "latentsearch installed in $(pwd)/.venv"
