// The bf16 GEMM (and its operand conversions) against a double-precision reference on the
// same bf16 inputs, for the avx512_bf16 kernels (when this CPU has them) and the portable
// ones. Outputs are poisoned with NaN first; every element is checked.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/gemm_bf16_cpu.h"
#include "common/half.h"

namespace sinkdlm::bf16 {
namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<bfloat16> random_bf16(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<bfloat16> x(n);
  for (auto& e : x) e = to_bfloat16(normal(rng));
  return x;
}

enum class ALayout { kRows, kPairs };

// One GEMM call: A (m x k) either row-major with a wider stride or as interleaved row pairs of
// its transpose; B (k x n) packed from a row-major source; C (m x n) with a wider stride.
void check_gemm(const Kernels& kern, int64_t m, int64_t n, int64_t k, float beta, ALayout layout) {
  std::mt19937 rng(static_cast<uint32_t>(m * 1000003 + n * 1009 + k));
  const std::vector<bfloat16> a = random_bf16(m * k, rng), b = random_bf16(k * n, rng);
  const float alpha = 0.75f;

  // A operand.
  std::vector<bfloat16> a_op;
  int64_t a_row, a_pair;
  if (layout == ALayout::kRows) {
    const int64_t lda = k + 3;
    a_op.assign(m * lda, bfloat16{0x7fc0});  // NaN past each row: must never be read
    for (int64_t i = 0; i < m; ++i)
      for (int64_t p = 0; p < k; ++p) a_op[i * lda + p] = a[i * k + p];
    a_row = lda, a_pair = 2;
  } else {
    // A = X^T with X (k x m) row-major; to_pairs of X, via float.
    const int64_t ld = m + 5;
    std::vector<float> x(k * m);
    for (int64_t p = 0; p < k; ++p)
      for (int64_t i = 0; i < m; ++i) x[p * m + i] = to_float(a[i * k + p]);
    a_op.assign((k + 1) / 2 * 2 * ld, bfloat16{0x7fc0});
    kern.to_pairs(k, m, x.data(), m, a_op.data(), ld);
    a_row = 2, a_pair = 2 * ld;
  }

  const int64_t b_panel = panel_size(k) + 64;  // panels need not be adjacent
  std::vector<bfloat16> bp((n + kPanel - 1) / kPanel * b_panel, bfloat16{0x7fc0});
  pack_b(k, n, b.data(), n, 1, bp.data(), b_panel);

  const int64_t ldc = n + 7;
  std::vector<float> c(m * ldc, kNaN), c0(c.size());
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? kNaN : normal(rng);
  c0 = c;
  kern.gemm(m, n, k, alpha, a_op.data(), a_row, a_pair, bp.data(), b_panel, beta, c.data(), ldc);

  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0, mag = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double prod = double{to_float(a[i * k + p])} * to_float(b[p * n + j]);
        acc += prod;
        mag += std::abs(prod);
      }
      const double want = alpha * acc + (beta == 0.0f ? 0.0 : beta * c0[i * ldc + j]);
      // fp32 summation of exact products: error grows with k and the magnitudes summed.
      const double tol = 1e-6 * (1 + k) * (alpha * mag + std::abs(want)) + 1e-6;
      ASSERT_NEAR(c[i * ldc + j], want, tol) << kern.name << " C(" << i << ", " << j << ")";
    }
    for (int64_t j = n; j < ldc; ++j)  // past n: untouched
      ASSERT_TRUE(std::isnan(c[i * ldc + j]) || c[i * ldc + j] == c0[i * ldc + j]);
  }
}

std::vector<const Kernels*> all_kernels() {
  std::vector<const Kernels*> ks{&portable_kernels()};
  if (avx512_kernels()) ks.push_back(avx512_kernels());
  return ks;
}

using Shape = std::tuple<int64_t, int64_t, int64_t>;

class GemmBf16 : public ::testing::TestWithParam<Shape> {};

TEST_P(GemmBf16, MatchesDoubleReference) {
  const auto [m, n, k] = GetParam();
  for (const Kernels* kern : all_kernels())
    for (float beta : {0.0f, 1.0f})
      for (ALayout layout : {ALayout::kRows, ALayout::kPairs}) {
        SCOPED_TRACE(std::string(kern->name) + " beta " + std::to_string(beta) +
                     (layout == ALayout::kRows ? " rows" : " pairs"));
        check_gemm(*kern, m, n, k, beta, layout);
      }
}

const std::vector<int64_t> kSizes{1, 3, 15, 16, 17, 33, 64, 130, 513};

INSTANTIATE_TEST_SUITE_P(Sizes, GemmBf16,
                         ::testing::Combine(::testing::ValuesIn(kSizes),
                                            ::testing::ValuesIn(kSizes),
                                            ::testing::ValuesIn(kSizes)),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           return "m" + std::to_string(std::get<0>(info.param)) + "_n" +
                                  std::to_string(std::get<1>(info.param)) + "_k" +
                                  std::to_string(std::get<2>(info.param));
                         });

TEST(GemmBf16, FastKernelsPresentWhereTheCpuHasThem) {
  __builtin_cpu_init();
  const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512bf16");
  EXPECT_EQ(avx512_kernels() != nullptr, cpu);
}

// pack_b against the layout formula, for each of its cases: unit stride_j, unit stride_p,
// neither; padding (the row past an odd k, columns past n) zero.
TEST(GemmBf16, PackBMatchesLayout) {
  std::mt19937 rng(11);
  for (int64_t k : {1, 2, 7, 64})
    for (int64_t n : {1, 31, 32, 33, 70})
      for (int form = 0; form < 3; ++form) {
        // Source: row-major with spare columns, column-major with spare rows, every other element.
        const int64_t stride_p = form == 0 ? n + 1 : form == 1 ? 1 : 2;
        const int64_t stride_j = form == 0 ? 1 : form == 1 ? k + 3 : 2 * k;
        const std::vector<bfloat16> src = random_bf16(k * stride_p + n * stride_j + 4, rng);
        const int64_t b_panel = panel_size(k) + 5;
        std::vector<bfloat16> dst((n + kPanel - 1) / kPanel * b_panel, bfloat16{0x7fc0});
        pack_b(k, n, src.data(), stride_p, stride_j, dst.data(), b_panel);
        for (int64_t p = 0; p < k + k % 2; ++p)
          for (int64_t j = 0; j < (n + kPanel - 1) / kPanel * kPanel; ++j) {
            const uint16_t want = p < k && j < n ? src[p * stride_p + j * stride_j].bits : 0;
            const int64_t at =
                (j / kPanel) * b_panel + (p / 2) * 2 * kPanel + (j % kPanel) * 2 + p % 2;
            ASSERT_EQ(dst[at].bits, want)
                << "form " << form << " k " << k << " n " << n << " (" << p << ", " << j << ")";
          }
      }
}

// to_rows rounds to nearest even exactly like to_bfloat16, tails included; to_pairs
// interleaves rows and zeroes the pad row of an odd m.
TEST(GemmBf16, ConversionsMatchScalarRounding) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (const Kernels* kern : all_kernels())
    for (int64_t m : {1, 2, 5})
      for (int64_t n : {1, 15, 16, 17, 31, 32, 33, 70}) {
        const int64_t lds = n + 2, ldd = n + 3;
        std::vector<float> src(m * lds);
        for (auto& x : src) x = normal(rng) * 1000.0f;
        std::vector<bfloat16> rows(m * ldd, bfloat16{0x7fc0});
        kern->to_rows(m, n, src.data(), lds, rows.data(), ldd);
        std::vector<bfloat16> pairs((m + 1) / 2 * 2 * ldd, bfloat16{0x7fc0});
        kern->to_pairs(m, n, src.data(), lds, pairs.data(), ldd);
        for (int64_t r = 0; r < m + m % 2; ++r)
          for (int64_t c = 0; c < n; ++c) {
            const uint16_t want = r < m ? to_bfloat16(src[r * lds + c]).bits : 0;
            if (r < m) ASSERT_EQ(rows[r * ldd + c].bits, want) << kern->name << " rows " << r;
            ASSERT_EQ(pairs[(r / 2) * 2 * ldd + 2 * c + r % 2].bits, want)
                << kern->name << " pairs " << r << ", " << c;
          }
        for (int64_t r = 0; r < m; ++r)  // past n: untouched
          for (int64_t c = n; c < ldd; ++c) ASSERT_EQ(rows[r * ldd + c].bits, 0x7fc0);
      }
}

}  // namespace
}  // namespace sinkdlm::bf16
