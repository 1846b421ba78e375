// bf16 x bf16 -> fp32 GEMM for the bf16 CPU kernels. It exists because torch exports no bf16
// GEMM with fp32 output that runs at bf16 speed on CPUs with avx512_bf16 but no AMX (its
// oneDNN path is internal, MKL's gemm_bf16bf16f32 runs at sgemm speed there): converting to
// float and calling sgemm leaves the attention kernels ~1.5x slower than SDPA in bf16.
// The fast kernels use vdpbf16ps and are picked at run time; portable ones (same layouts,
// same results up to fp32 summation order) exist for tests and other CPUs.
#pragma once

#include <cstdint>

#include "common/half.h"

namespace sinkdlm::bf16 {

// B operands are packed in panels of kPanel columns, each holding its k rows in pairs
// (the VNNI layout vdpbf16ps wants): B(p, j) is at
//   b[(j / kPanel) * b_panel + (p / 2) * 2 * kPanel + (j % kPanel) * 2 + p % 2].
// A panel is contiguous (so it stays in L1 while it meets every row of A); columns past n
// and the row past an odd k are zero. pack_b writes this layout.
constexpr int64_t kPanel = 32;

// Elements one packed panel of k rows takes: the b_panel of a B packed on its own.
inline int64_t panel_size(int64_t k) { return (k + 1) / 2 * 2 * kPanel; }
// Elements a packed k x n B takes.
inline int64_t packed_size(int64_t k, int64_t n) {
  return (n + kPanel - 1) / kPanel * panel_size(k);
}

// Packs B(p, j) = src[p * stride_p + j * stride_j] (k x n) into dst with panel stride
// b_panel (>= panel_size(k)), padding included. Plain C++ with fast cases for unit stride_j
// (row pairs interleaved) and unit stride_p (pairs copied whole); used for K and V once per
// call and for small tiles.
void pack_b(int64_t k, int64_t n, const bfloat16* src, int64_t stride_p, int64_t stride_j,
            bfloat16* dst, int64_t b_panel);

struct Kernels {
  const char* name;
  // C[i, j] = alpha * sum_p A(i, p) B(p, j) + beta * C[i, j] for i < m, j < n, summed in fp32.
  // beta == 0: C is only written. B packed as above (panel stride b_panel). A(i, p) is at
  //   a[i * a_row + (p / 2) * a_pair + p % 2]
  // so a row-major A is (a_row = lda, a_pair = 2) and pairs of rows interleaved (to_pairs:
  // the transpose of a row-major matrix, as A) is (a_row = 2, a_pair = 2 * ld). With odd k,
  // A's element past the end of a row is never read.
  void (*gemm)(int64_t m, int64_t n, int64_t k, float alpha, const bfloat16* a, int64_t a_row,
               int64_t a_pair, const bfloat16* b, int64_t b_panel, float beta, float* c,
               int64_t ldc);
  // dst[r * ldd + c] = bf16(src[r * lds + c]) (round to nearest even), r < m, c < n.
  void (*to_rows)(int64_t m, int64_t n, const float* src, int64_t lds, bfloat16* dst, int64_t ldd);
  // Rows r and r + 1 interleaved: dst[(r / 2) * 2 * ldd + 2 * c + r % 2] = bf16(src[r * lds + c]);
  // the row past an odd m is zero. Read as A with (a_row = 2, a_pair = 2 * ldd) it is src^T.
  void (*to_pairs)(int64_t m, int64_t n, const float* src, int64_t lds, bfloat16* dst, int64_t ldd);
};

// vdpbf16ps kernels, or null when this CPU lacks avx512f/avx512bw/avx512_bf16.
const Kernels* avx512_kernels();
// Plain C++ kernels: run anywhere (fp32 math on converted operands).
const Kernels& portable_kernels();

}  // namespace sinkdlm::bf16
