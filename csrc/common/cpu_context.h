// What a torch-free CPU kernel needs from its host: a parallel loop and a GEMM.
// The extension passes at::parallel_for and the BLAS that torch links (MKL/OpenBLAS);
// GoogleTest passes a serial loop. Kernels never see torch.
#pragma once

#include <cstdint>
#include <functional>

#include "common/half.h"

namespace sinkdlm {

namespace bf16 {
struct Kernels;  // common/gemm_bf16_cpu.h
}

// Row-major C[m x n] = alpha * op(A)[m x k] * op(B)[k x n] + beta * C.
template <typename T>
using GemmFn = void (*)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                        const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                        int64_t ldc);

// The same with bfloat16 A and B and a float C: the BLAS's mixed-precision GEMM (MKL's
// gemm_bf16bf16f32, on AMX tiles or vdpbf16ps as the CPU has them).
using GemmBf16Fn = void (*)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                            float alpha, const bfloat16* a, int64_t lda, const bfloat16* b,
                            int64_t ldb, float beta, float* c, int64_t ldc);

// Runs fn(begin, end) over disjoint chunks covering [0, n), possibly in parallel, each chunk of
// at least `grain` items where n allows (at::parallel_for's grain_size: small work stays on one
// thread).
using ParallelFor = std::function<void(int64_t n, int64_t grain,
                                       const std::function<void(int64_t begin, int64_t end)>& fn)>;

struct CpuContext {
  ParallelFor parallel_for;
  GemmFn<float> sgemm;
  GemmFn<double> dgemm;
  // Null where the host's BLAS has no bfloat16 GEMM (then bfloat16 is converted for sgemm).
  GemmBf16Fn bf16_gemm = nullptr;
  // bf16 x bf16 -> fp32 GEMM kernels for bf16 inputs; null: bf16 runs through sgemm.
  const bf16::Kernels* bf16 = nullptr;

  template <typename T>
  GemmFn<T> gemm() const;
};
template <>
inline GemmFn<float> CpuContext::gemm<float>() const {
  return sgemm;
}
template <>
inline GemmFn<double> CpuContext::gemm<double>() const {
  return dgemm;
}

// Plain triple loop, used by the unit tests and when no BLAS is found at run time.
template <typename T>
void reference_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// The facts about the CPU that the choice of bf16 GEMM kernels depends on.
struct CpuFeatures {
  bool avx512_bf16 = false;  // avx512f, avx512bw and avx512_bf16: the vdpbf16ps kernels run
  bool amd = false;          // vendor AuthenticAMD
};
CpuFeatures detect_cpu_features();

// The bf16 GEMM kernels for a CPU with `cpu`, or null for float32 GEMMs on converted tiles.
// Rule (measured with benchmarks/attention_cpu.py): vdpbf16ps where it outruns the float32 FMA,
// i.e. on AMD CPUs with avx512_bf16 (Zen 4: 2-4x SDPA in bf16); elsewhere sgemm. A Xeon with
// avx512_bf16 and avx512_fp16 ran vdpbf16ps zmm at half the flop rate of vfmadd231ps (32 vs 66
// GFLOP/s per core), so there bf16 through sgemm is ~2x faster; a Xeon with AMX runs it at 1.46x
// (101 vs 70), yet the kernel, forced, was still 1.4-1.6x slower than sgemm there (and bf16 runs
// the composed path on AMX CPUs anyway: ops/cpu_paths.py).
// `override_name` (the SINKDLM_CPU_BF16_GEMM environment variable, for tests and benchmarks)
// forces one: "avx512_bf16", "fp32" or "portable"; null, "" or "auto" apply the rule. Throws
// std::invalid_argument for another name or for "avx512_bf16" on a CPU without it.
const bf16::Kernels* choose_bf16_kernels(const CpuFeatures& cpu, const char* override_name);

// The name of what choose_bf16_kernels picks for this CPU and environment: "avx512_bf16",
// "portable" or "fp32" (sgemm).
const char* cpu_bf16_gemm_name();

// A context whose GEMM is the BLAS that the host process has loaded (torch's), falling
// back to reference_gemm when none is, and the bf16 kernels choose_bf16_kernels picks for this
// CPU (and SINKDLM_CPU_BF16_GEMM).
CpuContext make_cpu_context(ParallelFor parallel_for);

// One-thread loop: for tests and tools.
void serial_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace sinkdlm
