// What a torch-free CPU kernel needs from its host: a parallel loop and a GEMM.
// The extension passes at::parallel_for and the BLAS that torch links (MKL/OpenBLAS);
// GoogleTest passes a serial loop. Kernels never see torch.
#pragma once

#include <cstdint>
#include <functional>

namespace sinkdlm {

namespace bf16 {
struct Kernels;  // common/gemm_bf16_cpu.h
}

// Row-major C[m x n] = alpha * op(A)[m x k] * op(B)[k x n] + beta * C.
template <typename T>
using GemmFn = void (*)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                        const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                        int64_t ldc);

// Runs fn(begin, end) over disjoint chunks covering [0, n), possibly in parallel, each chunk of
// at least `grain` items where n allows (at::parallel_for's grain_size: small work stays on one
// thread).
using ParallelFor = std::function<void(int64_t n, int64_t grain,
                                       const std::function<void(int64_t begin, int64_t end)>& fn)>;

struct CpuContext {
  ParallelFor parallel_for;
  GemmFn<float> sgemm;
  GemmFn<double> dgemm;
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

// A context whose GEMM is the BLAS that the host process has loaded (torch's), falling
// back to reference_gemm when none is, and the avx512_bf16 kernels when the CPU has them.
CpuContext make_cpu_context(ParallelFor parallel_for);

// One-thread loop: for tests and tools.
void serial_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace sinkdlm
