#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with the wheels the GPU truth kit needs on a GPU machine without network.
# That machine has Python 3.12 with torch (CUDA), transformers, peft, accelerate, numpy, pyyaml, tqdm, psutil,
# safetensors, pyarrow, pandas, xxhash, einops, msgpack, ninja, py-cpuinfo; it lacks what is fetched here.
# Versions are this project's lock (requirements/cpu-lock.txt). Run from anywhere; prints the folder's size.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS:-.gpu_wheels}
LOCK=requirements/cpu-lock.txt
PY=${PYTHON:-.venv/bin/python}
pin() { grep -E "^$1==" "$LOCK" | head -1 || true; }
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# Binary wheels for CPython 3.12 on x86-64 Linux (pure-Python ones match "any").
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_35_x86_64 --platform any \
  -d "$DEST" \
  "$(pin bitsandbytes)" "$(pin torchao)" "$(pin datasets)" "$(pin pydantic)" \
  "pydantic-core==$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  "annotated-types==$("$PY" -c 'import importlib.metadata as m; print(m.version("annotated-types"))')" \
  "typing-inspection==$("$PY" -c 'import importlib.metadata as m; print(m.version("typing-inspection"))')" \
  "hjson==$("$PY" -c 'import importlib.metadata as m; print(m.version("hjson"))')" \
  "dill==$("$PY" -c 'import importlib.metadata as m; print(m.version("dill"))')" \
  "multiprocess==$("$PY" -c 'import importlib.metadata as m; print(m.version("multiprocess"))')" \
  2> >(grep -v "is neither a file nor a directory" >&2)
# DeepSpeed publishes only an sdist: build its pure-Python wheel here (its CUDA ops are built on first use there).
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" "$(pin deepspeed)" \
  2> >(grep -v "is neither a file nor a directory" >&2)
ls -1 "$DEST"
du -sh "$DEST"
