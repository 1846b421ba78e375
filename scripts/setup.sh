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
PY=${PYTHON:-python3}
PYTHON=$PY bash scripts/system-deps.sh
# Outside a venv, Debian's python3 refuses pip installs (PEP 668, "externally managed"). pip
# then installs into /usr/local (root) or ~/.local (a user), beside Debian's own packages, which
# it leaves alone; that is what the README's `python3 -m sinkdlm demo` outside a venv needs.
EXTERNALLY_MANAGED='
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(not (sys.prefix == sys.base_prefix and os.path.exists(marker)))'
if $PY -c "$EXTERNALLY_MANAGED"; then
  echo "sinkdlm: $PY is Debian's, outside a venv: pip installs with --break-system-packages"
  export PIP_BREAK_SYSTEM_PACKAGES=1
fi
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
