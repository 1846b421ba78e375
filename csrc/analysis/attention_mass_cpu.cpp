#include "analysis/attention_mass_cpu.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/half.h"
#include "common/row_ops.h"

namespace sinkdlm {
namespace {

// Blocks of the score matrix S = scale Q K^T, one GEMM each: kQueryBlock rows of Q against
// kKeyBlock keys (a 64 x 512 float block, 128 KB, stays in L2 while its rows are exponentiated
// and summed into the block's column sums).
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 512;

bool valid(const AttentionMassParams& p) {
  return p.q && p.k && p.lse && p.mass && p.sink_mass &&
         (p.dtype == ScalarType::kFloat32 || p.dtype == ScalarType::kFloat64) && p.batch >= 0 &&
         p.heads > 0 && p.kv_heads > 0 && p.heads % p.kv_heads == 0 && p.seq_len >= 0 &&
         p.head_dim > 0 && !(p.qk_bfloat16 && p.dtype != ScalarType::kFloat32);
}

// One thread's buffers, reused across its heads: K and a block of Q, in T, or in bfloat16 where
// the scores run on the bfloat16 GEMM (bf16_gemm; q is then also kept in T for the sink's dot).
template <typename T>
struct Scratch {
  Scratch(const AttentionMassParams& p, bool on_bf16_gemm)
      : bf16_gemm(on_bf16_gemm),
        k(on_bf16_gemm ? 0 : p.seq_len * p.head_dim),
        q(kQueryBlock * p.head_dim),
        scores(kQueryBlock * kKeyBlock),
        block_sum(kKeyBlock),
        k16(on_bf16_gemm ? p.seq_len * p.head_dim : 0),
        q16(on_bf16_gemm ? kQueryBlock * p.head_dim : 0) {}
  bool bf16_gemm;
  std::vector<T> k, q, scores, block_sum;
  std::vector<bfloat16> k16, q16;
  std::vector<double> acc;
};

// scores = scale Q K[j0, j0 + n)^T (m x n, row stride n) from the rows the scratch holds.
template <typename T>
void score_block(const CpuContext& ctx, Scratch<T>& s, int64_t m, int64_t n, int64_t D, int64_t j0,
                 T scale) {
  if constexpr (std::is_same_v<T, float>) {
    if (s.bf16_gemm) {
      ctx.bf16_gemm(false, true, m, n, D, scale, s.q16.data(), D, s.k16.data() + j0 * D, D, 0.0f,
                    s.scores.data(), n);
      return;
    }
  }
  ctx.gemm<T>()(false, true, m, n, D, scale, s.q.data(), D, s.k.data() + j0 * D, D, T(0),
                s.scores.data(), n);
}

// rows x D rows of x (row stride ls, element stride ds) densely into dst, converted to Out.
template <typename Out, typename In>
void gather_rows(const In* x, int64_t ls, int64_t ds, int64_t rows, int64_t D, Out* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) {
      if constexpr (std::is_same_v<Out, In>)
        dst[r * D + d] = x[r * ls + d * ds];
      else
        dst[r * D + d] = load<Out>(x[r * ls + d * ds]);
    }
}

// In: the storage type of q and k (T, or bfloat16 with T float).
template <typename In, typename T>
void one_head(const AttentionMassParams& p, const CpuContext& ctx, int64_t b, int64_t h,
              Scratch<T>& s) {
  const int64_t L = p.seq_len, D = p.head_dim;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const bool* mask = p.key_padding_mask ? p.key_padding_mask + b * L : nullptr;
  auto real = [&](int64_t i) { return mask == nullptr || mask[i]; };
  int64_t n_real = 0;
  for (int64_t i = 0; i < L; ++i) n_real += real(i) ? 1 : 0;

  const Strides4 &qs = p.q_stride, &ks = p.k_stride;
  const In* qb = static_cast<const In*>(p.q) + b * qs.b + h * qs.h;
  const In* kb = static_cast<const In*>(p.k) + b * ks.b + hk * ks.h;
  const T* lb = static_cast<const T*>(p.lse) + (b * p.heads + h) * L;
  const T* sk =
      p.sink_k ? static_cast<const T*>(p.sink_k) + b * p.sink_batch_stride + hk * D : nullptr;
  const T* sink_logit = static_cast<const T*>(p.sink_logit);
  if (s.bf16_gemm)
    gather_rows(kb, ks.l, ks.d, L, D, s.k16.data());
  else
    gather_rows(kb, ks.l, ks.d, L, D, s.k.data());
  s.acc.assign(L, 0.0);
  double sink_acc = 0.0;
  const T scale = static_cast<T>(p.scale);

  for (int64_t i0 = 0; i0 < L; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, L - i0);
    gather_rows(qb + i0 * qs.l, qs.l, qs.d, m, D, s.q.data());
    if (s.bf16_gemm) gather_rows(qb + i0 * qs.l, qs.l, qs.d, m, D, s.q16.data());
    for (int64_t r = 0; r < m; ++r) {  // the sink is one more key, and the logit sink one more
      if (!real(i0 + r)) continue;
      const double lse_i = static_cast<double>(lb[i0 + r]);
      if (sk != nullptr) {
        const T dot = row::dot(s.q.data() + r * D, sk, D);
        sink_acc += std::exp(static_cast<double>(dot * scale) - lse_i);
      }
      if (sink_logit != nullptr) sink_acc += std::exp(static_cast<double>(sink_logit[h]) - lse_i);
    }
    for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
      const int64_t n = std::min(kKeyBlock, L - j0);
      score_block(ctx, s, m, n, D, j0, scale);
      T* scores = s.scores.data();
      // P_ij = exp(S_ij - lse_i), summed over the block's real rows in T, then into the double
      // totals: a rounding error of at most kQueryBlock terms in float.
      T* block_sum = s.block_sum.data();
      std::fill(block_sum, block_sum + n, T(0));
      for (int64_t r = 0; r < m; ++r) {
        if (!real(i0 + r)) continue;
        T* row = scores + r * n;
        row::exp_sub(row, n, lb[i0 + r]);
        row::axpy(T(1), row, block_sum, n);
      }
      for (int64_t j = 0; j < n; ++j) s.acc[j0 + j] += static_cast<double>(block_sum[j]);
    }
  }
  T* out = static_cast<T*>(p.mass) + (b * p.heads + h) * L;
  const double inv = n_real > 0 ? 1.0 / static_cast<double>(n_real) : 0.0;
  for (int64_t j = 0; j < L; ++j) out[j] = real(j) ? static_cast<T>(s.acc[j] * inv) : T(0);
  static_cast<T*>(p.sink_mass)[b * p.heads + h] = static_cast<T>(sink_acc * inv);
}

template <typename In, typename T>
void all_heads(const AttentionMassParams& p, const CpuContext& ctx) {
  ctx.parallel_for(p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    // bfloat16 scores on the BLAS's bfloat16 GEMM where it has one, else q and k converted.
    Scratch<T> s(p, std::is_same_v<In, bfloat16> && ctx.bf16_gemm != nullptr);
    for (int64_t bh = begin; bh < end; ++bh) one_head<In>(p, ctx, bh / p.heads, bh % p.heads, s);
  });
}

}  // namespace

bool attention_mass_cpu(const AttentionMassParams& p, const CpuContext& ctx) {
  if (!valid(p)) return false;
  if (p.dtype == ScalarType::kFloat64)
    all_heads<double, double>(p, ctx);
  else if (p.qk_bfloat16)
    all_heads<bfloat16, float>(p, ctx);
  else
    all_heads<float, float>(p, ctx);
  return true;
}

}  // namespace sinkdlm
