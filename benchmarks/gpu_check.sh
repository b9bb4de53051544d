#!/usr/bin/env bash
# The GPU truth kit's one command, for a CUDA machine without network (see benchmarks/README.md):
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
# Installs the wheels of .gpu_wheels/ (made here by scripts/gpu_wheels.sh) into a temporary target in front of the
# machine's own packages, then runs benchmarks/gpu_check.py. With $OUT set (the device tool), the results and the
# log are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
# Only where the packages are missing (the project's own venv has them all).
if ! "$PY" -c "import deepspeed, bitsandbytes, pydantic, datasets" >/dev/null 2>&1 && ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu_wheels/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
LOG=$(mktemp /tmp/gpu_check_log.XXXXXX)
"$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/gpu_check"
  cp benchmarks/results/gpu_check/*/results.* benchmarks/results/gpu_check/*/env.json "$OUT/gpu_check/" 2>/dev/null
  cp "$LOG" "$OUT/gpu_check/log.txt"
fi
exit "$rc"
