#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/cpu_context.h"
#include "common/gemm_bf16_cpu.h"

// Fortran BLAS entry points. torch's libtorch_cpu exports them (from MKL or OpenBLAS);
// weak, so a process without BLAS (the unit tests) links and uses reference_gemm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's (torch's x86 builds link it): bfloat16 as uint16_t bit patterns, a float C.
void gemm_bf16bf16f32_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const uint16_t* a, const int* lda,
                       const uint16_t* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));
}

namespace sinkdlm {

template <typename T>
void reference_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T x = trans_a ? a[p * lda + i] : a[i * lda + p];
        const T y = trans_b ? b[j * ldb + p] : b[p * ldb + j];
        acc += x * y;
      }
      T& out = c[i * ldc + j];
      out = alpha * acc + (beta == T(0) ? T(0) : beta * out);
    }
  }
}
template void reference_gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*,
                                    int64_t, const float*, int64_t, float, float*, int64_t);
template void reference_gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*,
                                     int64_t, const double*, int64_t, double, double*, int64_t);

namespace {

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands. In: the
// element type of A and B as the BLAS takes it; T: that of C and the scalars.
template <typename T, typename In, typename Blas>
void blas_gemm(Blas blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
               const In* a, int64_t lda, const In* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  // BLAS rejects leading dimensions below the stored extent even when unused (k == 1 etc.).
  const int la = static_cast<int>(ldb > 1 ? ldb : 1), lb = static_cast<int>(lda > 1 ? lda : 1);
  const int lc = static_cast<int>(ldc > 1 ? ldc : 1);
  blas(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

void sgemm_blas(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  blas_gemm<float>(sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void dgemm_blas(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  blas_gemm<double>(dgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void bf16_gemm_blas(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                    const bfloat16* a, int64_t lda, const bfloat16* b, int64_t ldb, float beta,
                    float* c, int64_t ldc) {
  static_assert(sizeof(bfloat16) == sizeof(uint16_t));
  blas_gemm<float>(gemm_bf16bf16f32_, ta, tb, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a),
                   lda, reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
}

}  // namespace

CpuFeatures detect_cpu_features() {
  CpuFeatures cpu;
  cpu.avx512_bf16 = bf16::avx512_kernels() != nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  cpu.amd = __builtin_cpu_is("amd");
#endif
  return cpu;
}

const bf16::Kernels* choose_bf16_kernels(const CpuFeatures& cpu, const char* override_name) {
  const std::string name = override_name ? override_name : "";
  if (name.empty() || name == "auto")
    return cpu.avx512_bf16 && cpu.amd ? bf16::avx512_kernels() : nullptr;
  if (name == "fp32") return nullptr;
  if (name == "portable") return &bf16::portable_kernels();
  if (name == "avx512_bf16") {
    if (!cpu.avx512_bf16)
      throw std::invalid_argument(
          "SINKDLM_CPU_BF16_GEMM=avx512_bf16, but this CPU lacks avx512f/avx512bw/avx512_bf16");
    return bf16::avx512_kernels();
  }
  throw std::invalid_argument(
      "SINKDLM_CPU_BF16_GEMM must be auto, avx512_bf16, fp32 or "
      "portable, got '" +
      name + "'");
}

namespace {
const bf16::Kernels* this_cpu_bf16_kernels() {
  return choose_bf16_kernels(detect_cpu_features(), std::getenv("SINKDLM_CPU_BF16_GEMM"));
}
}  // namespace

const char* cpu_bf16_gemm_name() {
  const bf16::Kernels* kernels = this_cpu_bf16_kernels();
  return kernels ? kernels->name : "fp32";
}

CpuContext make_cpu_context(ParallelFor parallel_for) {
  CpuContext ctx;
  ctx.parallel_for = std::move(parallel_for);
  ctx.sgemm = sgemm_ ? &sgemm_blas : &reference_gemm<float>;
  ctx.dgemm = dgemm_ ? &dgemm_blas : &reference_gemm<double>;
  ctx.bf16_gemm = gemm_bf16bf16f32_ ? &bf16_gemm_blas : nullptr;
  ctx.bf16 = this_cpu_bf16_kernels();
  return ctx;
}

void serial_for(int64_t n, int64_t /*grain*/, const std::function<void(int64_t, int64_t)>& fn) {
  if (n > 0) fn(0, n);
}

}  // namespace sinkdlm
