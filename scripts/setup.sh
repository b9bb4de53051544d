#!/usr/bin/env bash
# Create .venv and install the engine for this machine (CPU torch pinned by requirements/cpu-lock.txt).
# Idempotent: a second run reuses the venv and installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's constraint file keeps torch on the CPU build for every package that asks for it.
export PIP_CONSTRAINT="$PWD/requirements/cpu-lock.txt"
# (this machine's pip config lists local indexes that may be absent; drop those warnings, keep real errors)
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2> >(grep -v "is neither a file nor a directory" >&2)
