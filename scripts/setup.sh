#!/usr/bin/env bash
# Installs sinkdlm into the current Python environment, editable, against a CPU torch 2.13,
# after the Debian packages it needs (scripts/system-deps.sh).
#   - torch is pinned: `torch==2.13.0` is the CPU wheel; any other request pulls GBs of CUDA
#     wheels. On a machine with your own (CUDA) torch >= 2.11 installed, set SINKDLM_KEEP_TORCH=1.
#   - --no-build-isolation: an isolated build would download a second torch just to compile
#     against it; the extension must be built against the torch you run.
#   - nvcc on PATH: every CUDA source is compiled too (linked only if torch is a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
PY=${PYTHON:-python3}
if [ "${SINKDLM_KEEP_TORCH:-0}" != 1 ]; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
# CUDA 13's nvcc needs CMake >= 3.24 (Debian's 3.25 works); take PyPI's if ours is older.
if ! cmake --version 2>/dev/null | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=24))}'; then
  $PY -m pip install -q "cmake>=3.24"
fi
$PY -m pip install -q --no-build-isolation -e ".[test]"
$PY -c "import sinkdlm, sinkdlm._C as c; print('sinkdlm', sinkdlm.__version__, c.build_info())"
