"""Per-core peak of the vector instructions sinkdlm's CPU kernels are bound by, on this CPU.

Compiles cpu_throughput.c with the system C compiler and runs it on one core: float32 FMA
(vfmadd231ps zmm: sgemm, and the exp polynomial that bounds softmax and remask_step) and
vdpbf16ps zmm (the native bfloat16 micro-kernel), in GFLOP/s. Comparing these between CPU
families explains speed differences of the same code path: a kernel bound by FMA throughput
runs slower by the ratio of the two machines' FMA rates, whatever the code does.

    python3 benchmarks/cpu_throughput.py   # writes results/cpu_throughput_<amd|intel>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sinkdlm.ops.cpu_paths import cpu_features, cpu_model, cpu_vendor

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=200_000_000, help="rounds of 12 instructions")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: by CPU vendor)")
    args = ap.parse_args(argv)
    args.out = args.out or HERE / "results" / f"cpu_throughput_{cpu_vendor()}.json"
    if "avx512f" not in cpu_features():
        print("this CPU has no AVX-512: nothing to measure", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "cpu_throughput"
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "cpu_throughput.c")], check=True)
        # One core: taskset keeps the thread from migrating between the measurements.
        out = subprocess.run(
            ["taskset", "-c", "0", str(exe), str(args.iters)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    result = dict(cpu=cpu_model(), load_average=list(os.getloadavg()), **json.loads(out))
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
