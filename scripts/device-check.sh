#!/usr/bin/env bash
# Everything that needs a GPU, in one command: builds sinkdlm against the torch installed on the
# machine, checks that every op has a CUDA kernel, runs every CUDA test, runs every CUDA kernel
# under compute-sanitizer (scripts/cuda_smoke.py: small forward and backward cases) and runs the
# CUDA benchmarks. Logs and JSON go to DIR; DIR/summary.json says what passed.
#
#   bash scripts/device-check.sh DIR
#
# Made for a GPU machine with no network (an H200 with torch 2.11 + CUDA 13 and Python 3.12):
#   - the installed torch is kept and nothing is downloaded: sinkdlm is installed with
#     --no-build-isolation --no-deps, so the build needs nvcc, CMake, ninja, scikit-build-core and
#     pybind11 already there. Wheels put in .whl/ (ignored by git) are installed first, offline,
#     for test dependencies the machine lacks (expecttest, ...).
#   - each step has a time limit and the whole run a deadline (SINKDLM_DEVICE_CHECK_SECONDS,
#     default 470 s), so it ends inside 8 minutes; a step that fails or runs out of time is
#     recorded and the next one runs. Exit status 0 only if every step passed.
#   - through the device tool, whose $OUT returns 8 files at most:
#       bash scripts/device-check.sh /tmp/dc; rc=$?; tar -czf $OUT/device-check.tgz -C /tmp dc; exit $rc
#
# Environment (all optional): SINKDLM_DEVICE_CHECK_PARTS (default "tests sanitizer bench": the
# parts run after the build and the ops check, which always run; a second call on a machine still
# warm rebuilds incrementally in build/device, e.g. SINKDLM_DEVICE_CHECK_PARTS="sanitizer bench"
# after a first call whose deadline cut them); PYTHON (python3); SINKDLM_CUDA_ARCHS (default:
# this GPU's architecture alone, e.g. 90-real: the default list's other architectures cannot run
# here); SINKDLM_SANITIZER_TOOLS (default: memcheck; e.g. "memcheck racecheck initcheck");
# CMAKE_BUILD_PARALLEL_LEVEL (default: the number of cores).
set -uo pipefail
if [ $# != 1 ]; then
  echo "usage: bash scripts/device-check.sh DIR   (logs and JSON are written to DIR)" >&2
  exit 2
fi
PARTS=" ${SINKDLM_DEVICE_CHECK_PARTS:-tests sanitizer bench} "
for part in $PARTS; do
  case $part in tests | sanitizer | bench) ;; *)
    echo "SINKDLM_DEVICE_CHECK_PARTS: unknown part '$part' (expected: tests sanitizer bench)" >&2
    exit 2
    ;;
  esac
done
wanted() { case $PARTS in *" $1 "*) return 0 ;; esac; return 1; }
mkdir -p "$1" || exit 2
DIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
DEADLINE=$(($(date +%s) + ${SINKDLM_DEVICE_CHECK_SECONDS:-470}))
STEPS=$DIR/steps.tsv
: >"$STEPS"
failed=0

say() { echo "device-check: $*"; }


# record NAME STATUS SECONDS NOTE: one line of steps.tsv (summary.json is made from it)
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"
  case $2 in pass | skipped) ;; *) failed=1 ;; esac
  say "$1: $2 ($3 s)${4:+ - $4}"
}

# step NAME CAP CMD...: runs CMD for at most CAP seconds (less if the deadline is nearer), output
# in DIR/NAME.log, whose tail is printed if it fails.
step() {
  local name=$1 cap=$2 left t0 rc=0 status=pass
  shift 2
  left=$((DEADLINE - $(date +%s)))
  if [ $left -lt 15 ]; then
    record "$name" "out-of-time" 0 "not run: the ${SINKDLM_DEVICE_CHECK_SECONDS:-470} s deadline has passed"
    return 1
  fi
  [ "$cap" -gt $left ] && cap=$left
  t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >"$DIR/$name.log" 2>&1 || rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    status=timeout
  elif [ $rc != 0 ]; then
    status=fail
  fi
  record "$name" "$status" $(($(date +%s) - t0)) "$([ $status = pass ] || echo "exit $rc, see $name.log")"
  if [ $status != pass ]; then
    tail -n 15 "$DIR/$name.log" | sed 's/^/    | /'
  fi
  [ $status = pass ]
}

# ---- preflight: a GPU, or stop here ---------------------------------------------------------
if ! "$PY" - >"$DIR/preflight.log" 2>&1 <<'EOF'; then
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}")
if torch.version.cuda is None:
    sys.exit("this torch is a CPU build")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU")
print(f"GPU: {torch.cuda.get_device_name()}, compute capability {torch.cuda.get_device_capability()}")
EOF
  record preflight fail 0 "$(tail -n 1 "$DIR/preflight.log")"
  say "FAIL: this needs a machine with a GPU and a CUDA build of torch ($(head -n 1 "$DIR/preflight.log"))."
  say "On a machine without one, scripts/cuda-build-check.sh checks the CUDA build."
  exit 1
fi
record preflight pass 0 "$(tail -n 1 "$DIR/preflight.log")"

# ---- the machine, and wheels carried for it -----------------------------------------------------
{
  nvidia-smi || echo "nvidia-smi: not found"
  if [ -n "${CUDACXX:-}" ]; then "$CUDACXX" --version; else nvcc --version || /usr/local/cuda/bin/nvcc --version; fi
  cmake --version | head -n 1
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|pytest|expecttest|transformers|peft|scikit-build-core|pybind11|ninja|cmake|numpy) "
} >"$DIR/env.log" 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$DIR/site" .whl/*.whl && export PYTHONPATH="$DIR/site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$PY" -c "
import importlib.util as u
names = ['pytest', 'expecttest', 'transformers', 'peft', 'safetensors', 'accelerate', 'tokenizers']
print(' '.join(n for n in names if u.find_spec(n) is None))")
[ -z "$missing" ] || say "WARNING: missing Python packages: $missing (tests needing them fail or skip; carry their wheels in .whl/)"

# ---- build ----------------------------------------------------------------------------------
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
archs=${SINKDLM_CUDA_ARCHS:-$("$PY" -c "import torch; print('%d%d-real' % torch.cuda.get_device_capability())")}
# A sinkdlm left from an earlier run must not stand in for this build if it fails.
"$PY" -m pip uninstall -q -y sinkdlm >/dev/null 2>&1
step build 300 "$PY" -m pip install -v --no-build-isolation --no-deps --no-cache-dir \
  -C build-dir=build/device -C "cmake.define.SINKDLM_CUDA_ARCHS=$archs" .
"$PY" -c "import sinkdlm._C as c; print(c.build_info())" >"$DIR/build_info.log" 2>&1
if grep -q "'cuda_linked': True" "$DIR/build_info.log"; then
  record build_info pass 0 "$(cat "$DIR/build_info.log")"
else
  record build_info fail 0 "sinkdlm's CUDA kernels are not linked: $(tail -n 1 "$DIR/build_info.log")"
fi

# ---- every op has a CUDA kernel and a smoke case ----------------------------------------------
step ops 60 "$PY" scripts/cuda_smoke.py --ops

# ---- every CUDA test (the CUDA parameters of tests/devices.py are named "cuda") -----------------
if wanted tests; then
  step tests 240 "$PY" -m pytest -q tests -k cuda -rfEs -p no:cacheprovider \
    --junitxml "$DIR/pytest-cuda.xml"
fi

# ---- compute-sanitizer over every kernel (scripts/cuda_smoke.py) --------------------------------
if wanted sanitizer; then
  sanitizer=$(command -v compute-sanitizer || true)
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -z "$sanitizer" ] && [ -n "$d" ] && sanitizer=$(find "$d/" -maxdepth 2 -name compute-sanitizer -type f 2>/dev/null | head -n 1)
  done
  smoke_plain() { step smoke 90 "$PY" scripts/cuda_smoke.py --json "$DIR/smoke.json"; }
  if [ -z "$sanitizer" ]; then
    say "WARNING: *** compute-sanitizer not found (PATH, \$CUDA_HOME, /usr/local/cuda): the kernels run without it ***"
    record sanitizer skipped 0 "compute-sanitizer not found"
    smoke_plain
  elif ! timeout 90 "$sanitizer" --tool memcheck --error-exitcode 3 \
    "$PY" -c "import torch; torch.ones(8, device='cuda').sum().item()" >"$DIR/sanitizer_probe.log" 2>&1; then
    # Seen on gVisor machines: "Device not supported". Not a fault of the kernels: run them plainly.
    say "WARNING: *** compute-sanitizer cannot run on this machine (sanitizer_probe.log): the kernels run without it ***"
    record sanitizer skipped 0 "$sanitizer cannot run here: $(grep -m1 -i error "$DIR/sanitizer_probe.log")"
    smoke_plain
  else
    # No caching allocator: each tensor is its own allocation, so an access past its end is caught.
    for tool in ${SINKDLM_SANITIZER_TOOLS:-memcheck}; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitizer_$tool" 180 "$sanitizer" --tool "$tool" \
        --error-exitcode 3 --print-limit 50 "$PY" scripts/cuda_smoke.py --json "$DIR/smoke_$tool.json"
    done
  fi
fi

# ---- CUDA benchmarks (they write benchmarks/results/, copied to DIR/bench/) ---------------------
mkdir -p "$DIR/bench"
bench() {  # bench NAME SCRIPT ARGS...
  local name=$1 script=$2 marker
  shift 2
  if [ ! -f "$script" ]; then
    record "bench_$name" skipped 0 "$script does not exist yet"
    return
  fi
  marker=$(mktemp)
  step "bench_$name" 150 "$PY" "$script" "$@"
  find benchmarks/results -newer "$marker" -type f -exec cp {} "$DIR/bench/" \; 2>/dev/null
  rm -f "$marker"
}
if wanted bench; then
  bench remask benchmarks/remask.py --devices cuda --repeats 3
  # A slice of the README grid that fits the step's time (the whole grid: run it on its own).
  bench attention_cuda benchmarks/attention_cuda.py --lengths 4096 --head-dims 128 --reps 5
  # Issue 14's GPU rows at gen 512 (the ~125M preset, sliced head; each uncached run over 64 calls).
  bench generate benchmarks/generate.py --device cuda --preset issue --repeats 1 --heads sliced \
    --gen-lengths 512 --no-cache-calls 64 --skip-threshold
fi

# ---- summary --------------------------------------------------------------------------------
"$PY" - "$DIR" <<'EOF' || say "could not write summary.json"
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, note = line.split("\t")
    log = out / f"{name}.log"
    steps.append(dict(name=name, status=status, seconds=int(seconds), note=note,
                      log=log.name if log.exists() else None))
summary = dict(ok=all(s["status"] in ("pass", "skipped") for s in steps), steps=steps)
summary["machine"] = (out / "preflight.log").read_text().strip().splitlines()
if (out / "pytest-cuda.xml").exists():
    suite = ET.parse(out / "pytest-cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
for f in sorted(out.glob("smoke*.json")):
    summary[f.stem] = json.loads(f.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2))
EOF
if [ $failed = 0 ]; then
  say "PASS (logs and JSON in $DIR)"
else
  say "FAIL: $(awk -F'\t' '$2 != "pass" && $2 != "skipped" {printf "%s%s", sep, $1; sep=", "}' "$STEPS") (logs and JSON in $DIR)"
fi
exit $failed
