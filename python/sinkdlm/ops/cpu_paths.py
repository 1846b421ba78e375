"""Which CPU path ``sink_attention(backend="auto")`` takes: a rule over the CPU's instruction
sets and the dtype, so that each x86 family runs its fastest kernel.

The two CPU paths are sinkdlm's own kernel (``"native"``: float32 through the BLAS sgemm that
torch links, bfloat16 through sinkdlm's vdpbf16ps micro-kernel on CPUs with avx512_bf16, else
through sgemm too) and the composition (``"composed"``: ATen's CPU flash attention, whose tiles
run on oneDNN's brgemm, AMX tiles where the CPU has them, then sinkdlm's fused sink merge).

Which GEMMs the native kernel runs bfloat16 on is a second rule, in C++ (``choose_bf16_kernels``
in csrc/common/cpu_context.h; ``sinkdlm._C.cpu_bf16_gemm()`` names the pick): vdpbf16ps on AMD
CPUs with avx512_bf16, float32 sgemm on converted tiles elsewhere (on the Intel Xeon without AMX
vdpbf16ps runs at half its float32 FMA rate; on the AMX Xeon at 1.46x it, yet the vdpbf16ps
kernel, forced, ran 1.4-1.6x slower than sgemm on converted tiles there:
``benchmarks/results/attention_cpu_intel_amx_vdpbf16ps.json``).

The rule (``cpu_auto_backend``), each line from ``benchmarks/attention_cpu.py``:

* float32, float64: native. Measured on an AMD EPYC (avx512_bf16), an Intel Xeon
  (avx512_bf16 + avx512_fp16, no AMX) and an Intel Xeon with AMX: native is at parity with
  ATen's flash or ahead (it skips the concatenation). On the AMX Xeon composed, the same ATen
  kernel plus the merge, is within 4% of native forward (ahead in 5 of 6 rows) and up to 13%
  behind forward+backward, so native stays.
* bfloat16 with ``amx_bf16``: composed. Measured on the AMX Xeon: ATen's flash runs its tiles on
  oneDNN's AMX brgemm, and composed is 2.6-3.6x native forward and 1.1-2.3x forward+backward
  (native runs bfloat16 through sgemm on converted tiles there, and its vdpbf16ps kernel is
  slower still), 1-24% above ATen's flash with no sink at all (1-13% at L >= 1024).
* bfloat16 with avx512_bf16, no AMX: native (vdpbf16ps on AMD, sgemm on converted tiles on
  Intel: the second rule below), 2-4x faster than ATen's flash on the AMD machine and 1.2-2.0x
  on the Intel one without AMX.
* bfloat16 without avx512_bf16: native (its float32-GEMM path). Unmeasured: no such machine.
* float16 with ``amx_fp16``: composed (unmeasured: oneDNN's AMX-FP16 brgemm).
* float16 with avx512_fp16, no AMX-FP16: composed for a forward without gradients (ATen's
  float16 CPU flash forward measured 1.05-1.25x faster than native on the Intel Xeon, 5 of 6
  rows; 1.03-1.43x on the AMX Xeon, all 6), native when a backward follows (native 1.2-1.5x
  faster forward+backward on the first Xeon; on the AMX Xeon 1.03-1.17x faster in 4 of 6 rows,
  slower at D 128 with L <= 1024, 0.81x and 0.93x, rows that moved by up to 15% between runs:
  a split by head dim and length is not settled by one machine's noisy rows).
* float16 elsewhere: native (float32 GEMMs on converted tiles; ATen's CPU flash converts too).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = [
    "CPU_FEATURES",
    "CPU_FLAGS",
    "cpu_auto_backend",
    "cpu_features",
    "cpu_model",
    "cpu_vendor",
]

CPUINFO = Path("/proc/cpuinfo")  # Linux's; tests point it at a file of their own

# The flags the rule (and the benchmarks' records) look at, spelled as in /proc/cpuinfo.
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
)


def cpu_features() -> frozenset[str]:
    """This CPU's flags among ``CPU_FLAGS``: from /proc/cpuinfo on Linux, else from torch's own
    CPU probes (which know avx2, avx512, avx512_bf16, avx512_vnni, amx_tile and amx_fp16)."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split()) & frozenset(CPU_FLAGS)
    except OSError:
        pass
    probes = {
        "avx2": "_is_avx2_supported",
        "avx512f": "_is_avx512_supported",
        "avx512_vnni": "_is_vnni_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx_tile": "_is_amx_tile_supported",
        "amx_fp16": "_is_amx_fp16_supported",
    }
    found = {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}
    if "amx_tile" in found:  # torch checks amx_tile and amx_bf16 together
        found.add("amx_bf16")
    return frozenset(found)


def cpu_model() -> str:
    """This CPU as benchmarks record it: /proc/cpuinfo's model name with its family, model and
    stepping (a virtual machine may name only "AMD EPYC", which covers Zen 2 to Zen 5: the
    numbers tell them apart), else Python's processor name."""
    info = {}
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine()
    numbers = [f"{key} {info[key]}" for key in ("cpu family", "model", "stepping") if key in info]
    return info["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def cpu_vendor() -> str:
    """The CPU family a benchmark result is for, from the model name: amd, intel or other."""
    model = cpu_model()
    return next((v.lower() for v in ("AMD", "Intel") if v in model), "other")


# Read once at import, so that the rule is a constant to torch.compile.
CPU_FEATURES = cpu_features()


def cpu_auto_backend(
    features: frozenset[str] | set[str], dtype: torch.dtype, needs_grad: bool = False
) -> str:
    """The CPU path ``backend="auto"`` takes for ``dtype`` on a CPU with ``features`` (flags as
    in ``CPU_FLAGS``), ``needs_grad`` when a backward will follow (an input requires grad under
    grad mode): ``"native"`` or ``"composed"``. The module docstring gives each rule's
    measurement."""
    if dtype == torch.bfloat16 and "amx_bf16" in features:
        return "composed"
    if dtype == torch.float16:
        if "amx_fp16" in features:
            return "composed"
        if "avx512_fp16" in features and not needs_grad:
            return "composed"
    return "native"
