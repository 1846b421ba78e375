#!/usr/bin/env bash
# Proves the CUDA build without a GPU: installs a CUDA build of torch from PyPI into its own venv
# (never the one you work in), builds sinkdlm against it with the machine's nvcc, and checks what
# only a CUDA-linked build can show: every sinkdlm op has a CUDA kernel in the dispatcher, _C
# resolves all its symbols, the CUDA runtime is torch's shared one, and _C carries the SASS/PTX
# that build_info() claims. Exits non-zero on any failure, naming it.
#
#   bash scripts/cuda-build-check.sh
#
# Environment (all optional):
#   SINKDLM_CUDA_VENV    venv to create/reuse            (default: .venv-cuda in the repo, ignored)
#   SINKDLM_CUDA_TORCH   torch requirement               (default: torch==2.11.0, CUDA 13.0 on PyPI)
#   SINKDLM_CUDA_ARCHS   passed to CMake                 (default: CMakeLists.txt's list)
#   SINKDLM_CUDA_CHECK_ALLOW_MISSING  ops known to lack a CUDA kernel, space-separated: reported,
#                        not failed (an op listed here that has one fails: the list cannot go stale)
#   CUDACXX              nvcc                            (default: nvcc on PATH, else /usr/local/cuda)
#   PYTHON               interpreter that makes the venv (default: python3)
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs               (default: 2)
# A second run reuses the venv and the build directory (build/cuda-check): only what changed is
# rebuilt. Delete .venv-cuda to measure the download again (the wheels are ~3 GB, not cached).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
VENV=${SINKDLM_CUDA_VENV:-$repo/.venv-cuda}
TORCH_SPEC=${SINKDLM_CUDA_TORCH:-torch==2.11.0}
BUILD_DIR=build/cuda-check
LOG=$BUILD_DIR/build.log
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
mkdir -p "$BUILD_DIR"

if [ -z "${CUDACXX:-}" ]; then
  CUDACXX=$(command -v nvcc || true)
  [ -n "$CUDACXX" ] || CUDACXX=/usr/local/cuda/bin/nvcc
fi
if [ ! -x "$CUDACXX" ]; then
  echo "cuda-build-check: FAIL: no nvcc (looked for \$CUDACXX, nvcc on PATH, $CUDACXX)" >&2
  exit 1
fi
export CUDACXX
cuda_bin=$(dirname "$CUDACXX")
export PATH="$cuda_bin:$PATH"  # cuobjdump, and torch's CMake finds the toolkit next to nvcc

now() { date +%s; }
t0=$(now)

# ---- 1. a CUDA torch in its own venv ----------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY=$VENV/bin/python
# --no-cache-dir: the CUDA wheels would otherwise be kept a second time in pip's cache. The grep
# drops pip's warnings about this machine's empty local index directories.
pip_install() {
  "$PY" -m pip install -q --no-cache-dir "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}
echo "cuda-build-check: installing $TORCH_SPEC into $VENV"
pip_install "$TORCH_SPEC" numpy tqdm \
  "scikit-build-core>=0.10" "pybind11>=2.12" ninja
# cuobjdump lists the SASS/PTX in _C; PyPI has it where the toolkit lacks it.
nvcc_major=$("$CUDACXX" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
if ! command -v cuobjdump >/dev/null; then
  pip_install "nvidia-cuda-cuobjdump==$nvcc_major.*" || echo "cuda-build-check: no cuobjdump"
  cuobjdump=$(find "$VENV" -name cuobjdump -type f | head -1)
  [ -n "$cuobjdump" ] && PATH="$(dirname "$cuobjdump"):$PATH"
fi
if ! cmake --version 2>/dev/null | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=24))}'; then
  pip_install "cmake>=3.24"
fi
t1=$(now)

# ---- 2. build sinkdlm against it ----------------------------------------------
# Its own build dir, so the CPU build in build/{wheel_tag} is left alone; not editable, so the
# module lands in the venv and never next to the sources.
# Always passed (empty = the default), so a value from an earlier run does not stay in the cache.
defines=(-C "cmake.define.SINKDLM_CUDA_ARCHS=${SINKDLM_CUDA_ARCHS:-}")
echo "cuda-build-check: building sinkdlm (nvcc $CUDACXX, $CMAKE_BUILD_PARALLEL_LEVEL jobs; log: $LOG)"
if ! "$PY" -m pip install -v --no-build-isolation --no-deps --no-cache-dir \
  -C "build-dir=$BUILD_DIR/tree" "${defines[@]}" . >"$LOG" 2>&1; then
  grep -E "error|Error|FAILED" "$LOG" | head -40 >&2 || true
  echo "cuda-build-check: FAIL: the build failed (full log: $LOG)" >&2
  exit 1
fi
grep -E "sinkdlm backends|sinkdlm CUDA" "$LOG" | sed 's/^/  /' || true
t2=$(now)

# ---- 3. what the CUDA-linked module contains ----------------------------------
cd "$BUILD_DIR"  # away from the sources: import the installed package
set +e
"$PY" - <<'EOF'
import os
import re
import subprocess
import sys

# RTLD_NOW (CPython's default, made explicit): importing fails unless every symbol of _C resolves.
sys.setdlopenflags(os.RTLD_NOW)
import torch  # noqa: E402

import sinkdlm._C as C  # noqa: E402

failures = []
info = C.build_info()
so = C.__file__
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), sinkdlm from {os.path.dirname(so)}")
print(f"  build_info: {info}")
if not (info["cuda_compiled"] and info["cuda_linked"]):
    failures.append(f"build_info says the CUDA kernels are not linked: {info}")

# -- all symbols resolve: ldd -r, with torch's lib dir where the loader would find it
env = dict(os.environ)
torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
env["LD_LIBRARY_PATH"] = torch_lib + os.pathsep + env.get("LD_LIBRARY_PATH", "")
ldd = subprocess.run(["ldd", "-r", so], env=env, capture_output=True, text=True)
lines = (ldd.stdout + ldd.stderr).splitlines()
not_found = [ln.strip() for ln in lines if "not found" in ln]
# The interpreter provides the Python C API to every extension module: not linked, by design.
undefined = [
    ln.strip()
    for ln in lines
    if ln.startswith("undefined symbol") and not re.match(r"undefined symbol: _?Py", ln)
]
print(f"  ldd -r: {len(not_found)} libraries not found, {len(undefined)} undefined symbols")
failures += [f"ldd: {ln}" for ln in not_found + undefined[:20]]

# -- the CUDA runtime is torch's shared one, not a static copy inside _C
needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
cudart = re.findall(r"\[(libcudart\.so[^\]]*)\]", needed)
imported = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True)
if not cudart:
    failures.append("_C does not link libcudart.so (static runtime, or none)")
elif not re.search(r"\bcudaGetErrorString\b", imported.stdout):
    failures.append("_C defines cudaGetErrorString itself: a static CUDA runtime is linked in")
else:
    print(f"  CUDA runtime: shared, {cudart[0]} (torch's is in {torch_lib} or nvidia/*/lib)")

# -- the device code _C carries is what build_info reports (CMake's syntax: 90 = SASS + PTX,
# 90-real = SASS, 90-virtual = PTX)
def listed(flag):
    out = subprocess.run(["cuobjdump", flag, so], capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"sm_(\d+a?)\b", out)), key=lambda a: int(a.rstrip("a")))

want_sass, want_ptx = set(), set()
for arch in info["cuda_archs"].split(","):
    m = re.fullmatch(r"(\d+a?)(-real|-virtual)?", arch)
    if m is None:  # native, all, ...: nothing to compare with
        want_sass = want_ptx = None
        break
    if m[2] != "-virtual":
        want_sass.add(m[1])
    if m[2] != "-real":
        want_ptx.add(m[1])
try:
    sass, ptx = listed("--list-elf"), listed("--list-ptx")
    print(f"  device code: SASS {', '.join('sm_' + a for a in sass) or 'none'}; "
          f"PTX {', '.join('compute_' + a for a in ptx) or 'none'}")
    if want_sass is not None and (set(sass), set(ptx)) != (want_sass, want_ptx):
        failures.append(f"_C's device code (SASS {sass}, PTX {ptx}) is not what build_info says "
                        f"({info['cuda_archs']})")
    if not ptx:
        print("  (no PTX: GPUs newer than the SASS above cannot run these kernels)")
except FileNotFoundError:
    print("  device code: cuobjdump not found, not checked")

for f in failures:
    print(f"  FAIL: {f}")
sys.exit(1 if failures else 0)
EOF
rc=$?
# -- every op has a CUDA kernel (or a composite one, which serves every device) and a smoke case
echo "  ops (dispatcher, CUDA key):"
"$PY" "$repo/scripts/cuda_smoke.py" --ops || rc=1
set -e
cd "$repo"
[ $rc = 0 ] && echo "cuda-build-check: PASS" || echo "cuda-build-check: FAIL (see above)"
t3=$(now)
echo "cuda-build-check: times: torch install $((t1 - t0)) s, build $((t2 - t1)) s," \
  "checks $((t3 - t2)) s, total $((t3 - t0)) s"
echo "cuda-build-check: disk: venv $(du -sh "$VENV" | cut -f1), build dir $(du -sh "$BUILD_DIR" | cut -f1)"
exit $rc
