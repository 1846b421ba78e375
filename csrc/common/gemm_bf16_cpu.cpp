#include "common/gemm_bf16_cpu.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SINKDLM_HAVE_AVX512_BF16 1
#endif

namespace sinkdlm::bf16 {

void pack_b(int64_t k, int64_t n, const bfloat16* src, int64_t stride_p, int64_t stride_j,
            bfloat16* dst, int64_t b_panel) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t nj = std::min(kPanel, n - j0);
    uint16_t* panel = d + (j0 / kPanel) * b_panel;
    for (int64_t p = 0; p < k; p += 2) {
      uint16_t* out = panel + p * kPanel;  // pair row p / 2
      const uint16_t* r0 = s + p * stride_p + j0 * stride_j;
      const uint16_t* r1 = r0 + stride_p;
      if (p + 1 < k && stride_j == 1) {
        for (int64_t jj = 0; jj < nj; ++jj) out[2 * jj] = r0[jj], out[2 * jj + 1] = r1[jj];
      } else if (p + 1 < k && stride_p == 1) {
        for (int64_t jj = 0; jj < nj; ++jj) std::memcpy(out + 2 * jj, r0 + jj * stride_j, 4);
      } else {
        for (int64_t jj = 0; jj < nj; ++jj) {
          out[2 * jj] = r0[jj * stride_j];
          out[2 * jj + 1] = p + 1 < k ? r1[jj * stride_j] : 0;
        }
      }
      std::fill(out + 2 * nj, out + 2 * kPanel, uint16_t{0});
    }
  }
}

namespace {

// ---- portable ---------------------------------------------------------------------------

float a_at(const bfloat16* a, int64_t a_row, int64_t a_pair, int64_t i, int64_t p) {
  return to_float(a[i * a_row + (p / 2) * a_pair + p % 2]);
}

void gemm_portable(int64_t m, int64_t n, int64_t k, float alpha, const bfloat16* a, int64_t a_row,
                   int64_t a_pair, const bfloat16* b, int64_t b_panel, float beta, float* c,
                   int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const bfloat16* bj = b + (j / kPanel) * b_panel + (j % kPanel) * 2;
      float acc = 0;
      for (int64_t p = 0; p < k; ++p)
        acc += a_at(a, a_row, a_pair, i, p) * to_float(bj[(p / 2) * 2 * kPanel + p % 2]);
      float& out = c[i * ldc + j];
      out = beta == 0.0f ? alpha * acc : alpha * acc + beta * out;
    }
}

void to_rows_portable(int64_t m, int64_t n, const float* src, int64_t lds, bfloat16* dst,
                      int64_t ldd) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) dst[r * ldd + c] = to_bfloat16(src[r * lds + c]);
}

void to_pairs_portable(int64_t m, int64_t n, const float* src, int64_t lds, bfloat16* dst,
                       int64_t ldd) {
  for (int64_t r = 0; r < m + m % 2; ++r)
    for (int64_t c = 0; c < n; ++c)
      dst[(r / 2) * 2 * ldd + 2 * c + r % 2] = r < m ? to_bfloat16(src[r * lds + c]) : bfloat16{0};
}

const Kernels kPortable{"portable", gemm_portable, to_rows_portable, to_pairs_portable};

// ---- avx512_bf16 ------------------------------------------------------------------------

#ifdef SINKDLM_HAVE_AVX512_BF16
#define SINKDLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define SINKDLM_BF16_INLINE SINKDLM_BF16_TARGET inline __attribute__((always_inline))

// Rows of C per register block: kMR x 32 floats = 2 * kMR zmm accumulators.
constexpr int kMR = 8;

// One pair-row step of a block: NV zmm of the B panel, one broadcast A pair per row. The row
// past an odd k is loaded as 16 bits (A's next element may be out of bounds; B's pad is zero).
template <int MR, int NV, bool kHalf>
SINKDLM_BF16_INLINE void step(__m512 (&acc)[MR][NV], const uint16_t* a, int64_t a_row,
                              const uint16_t* b) {
  __m512i bv[NV];
  for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + v * 32);
  for (int i = 0; i < MR; ++i) {
    uint32_t x;
    if (kHalf) {
      x = a[i * a_row];
    } else {
      std::memcpy(&x, a + i * a_row, sizeof x);
    }
    const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(x));
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, (__m512bh)bv[v]);
  }
}

// One kMR-or-fewer x (16 * NV) block of C over all of k, in registers.
template <int MR, int NV>
SINKDLM_BF16_INLINE void block(int64_t k, float alpha, const uint16_t* a, int64_t a_row,
                               int64_t a_pair, const uint16_t* b, float beta, float* c, int64_t ldc,
                               __mmask16 mask0, __mmask16 mask1) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t kp = k / 2;
  for (int64_t p = 0; p < kp; ++p)
    step<MR, NV, false>(acc, a + p * a_pair, a_row, b + p * 2 * kPanel);
  if (k % 2) step<MR, NV, true>(acc, a + kp * a_pair, a_row, b + kp * 2 * kPanel);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      float* cp = c + i * ldc + v * 16;
      const __mmask16 mask = v == 0 ? mask0 : mask1;
      __m512 r = _mm512_mul_ps(acc[i][v], va);
      if (beta != 0.0f) r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, cp), vb, r);
      _mm512_mask_storeu_ps(cp, mask, r);
    }
}

template <int NV>
SINKDLM_BF16_INLINE void column_panel(int64_t m, int64_t k, float alpha, const uint16_t* a,
                                      int64_t a_row, int64_t a_pair, const uint16_t* b, float beta,
                                      float* c, int64_t ldc, __mmask16 mask0, __mmask16 mask1) {
  int64_t i = 0;
  for (; i + kMR <= m; i += kMR)
    block<kMR, NV>(k, alpha, a + i * a_row, a_row, a_pair, b, beta, c + i * ldc, ldc, mask0, mask1);
  const uint16_t* at = a + i * a_row;
  float* ct = c + i * ldc;
  switch (m - i) {
#define SINKDLM_TAIL(R) \
  case R:               \
    return block<R, NV>(k, alpha, at, a_row, a_pair, b, beta, ct, ldc, mask0, mask1);
    SINKDLM_TAIL(1)
    SINKDLM_TAIL(2)
    SINKDLM_TAIL(3)
    SINKDLM_TAIL(4)
    SINKDLM_TAIL(5)
    SINKDLM_TAIL(6)
    SINKDLM_TAIL(7)
#undef SINKDLM_TAIL
    default:
      return;
  }
  static_assert(kMR == 8, "the tail switch covers kMR - 1 rows");
}

SINKDLM_BF16_TARGET void gemm_avx512(int64_t m, int64_t n, int64_t k, float alpha,
                                     const bfloat16* a, int64_t a_row, int64_t a_pair,
                                     const bfloat16* b, int64_t b_panel, float beta, float* c,
                                     int64_t ldc) {
  const auto* a16 = reinterpret_cast<const uint16_t*>(a);
  const auto* b16 = reinterpret_cast<const uint16_t*>(b);
  // Panel by panel: the panel stays in L1 while every row of A passes by.
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t nj = std::min<int64_t>(kPanel, n - j0);
    const auto mask0 = static_cast<__mmask16>(nj >= 16 ? 0xffff : (1u << nj) - 1);
    const auto mask1 = static_cast<__mmask16>(nj >= 32  ? 0xffff
                                              : nj > 16 ? (1u << (nj - 16)) - 1
                                                        : 0);
    const uint16_t* bp = b16 + (j0 / kPanel) * b_panel;
    if (nj > 16)
      column_panel<2>(m, k, alpha, a16, a_row, a_pair, bp, beta, c + j0, ldc, mask0, mask1);
    else
      column_panel<1>(m, k, alpha, a16, a_row, a_pair, bp, beta, c + j0, ldc, mask0, mask1);
  }
}

// Masks of the first n (< 32) 16-bit lanes and first n (<= 16) 32-bit lanes.
SINKDLM_BF16_INLINE __mmask16 mask16(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1);
}

SINKDLM_BF16_TARGET void to_rows_avx512(int64_t m, int64_t n, const float* src, int64_t lds,
                                        bfloat16* dst, int64_t ldd) {
  for (int64_t r = 0; r < m; ++r) {
    const float* s = src + r * lds;
    auto* d = reinterpret_cast<uint16_t*>(dst + r * ldd);
    int64_t c = 0;
    for (; c + 32 <= n; c += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + c + 16), _mm512_loadu_ps(s + c));
      _mm512_storeu_si512(d + c, (__m512i)v);
    }
    if (c < n) {
      const int64_t t = n - c;
      const __m512 lo = _mm512_maskz_loadu_ps(mask16(t), s + c);
      const __m512 hi = _mm512_maskz_loadu_ps(mask16(t > 16 ? t - 16 : 0), s + c + 16);
      const auto mask = static_cast<__mmask32>((uint64_t{1} << t) - 1);
      _mm512_mask_storeu_epi16(d + c, mask, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

SINKDLM_BF16_TARGET void to_pairs_avx512(int64_t m, int64_t n, const float* src, int64_t lds,
                                         bfloat16* dst, int64_t ldd) {
  // cvtne2ps gives [row r: 16 | row r+1: 16]; this permutation interleaves them.
  alignas(64) static const uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                       21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                       11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i perm = _mm512_load_si512(kInterleave);
  for (int64_t r = 0; r < m; r += 2) {
    const float* s0 = src + r * lds;
    const float* s1 = r + 1 < m ? s0 + lds : nullptr;
    auto* d = reinterpret_cast<uint16_t*>(dst + (r / 2) * 2 * ldd);
    for (int64_t c = 0; c < n; c += 16) {
      const __mmask16 mask = mask16(n - c);
      const __m512 lo = _mm512_maskz_loadu_ps(mask, s0 + c);
      const __m512 hi = s1 ? _mm512_maskz_loadu_ps(mask, s1 + c) : _mm512_setzero_ps();
      const __m512i v = _mm512_permutexvar_epi16(perm, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      const int64_t t = std::min<int64_t>(16, n - c);
      const auto store_mask =
          static_cast<__mmask32>(t == 16 ? 0xffffffffu : (uint32_t{1} << (2 * t)) - 1);
      _mm512_mask_storeu_epi16(d + 2 * c, store_mask, v);
    }
  }
}

const Kernels kAvx512{"avx512_bf16", gemm_avx512, to_rows_avx512, to_pairs_avx512};
#endif

}  // namespace

const Kernels* avx512_kernels() {
#ifdef SINKDLM_HAVE_AVX512_BF16
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512bf16"))
    return &kAvx512;
#endif
  return nullptr;
}

const Kernels& portable_kernels() { return kPortable; }

}  // namespace sinkdlm::bf16
