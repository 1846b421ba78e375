#include "analysis/attention_mass_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

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
         p.head_dim > 0;
}

// One thread's buffers, reused across its heads.
template <typename T>
struct Scratch {
  std::vector<T> k, q, scores, block_sum;
  std::vector<double> acc;
};

// rows x D rows of x (row stride ls, element stride ds) copied densely into dst.
template <typename T>
void gather_rows(const T* x, int64_t ls, int64_t ds, int64_t rows, int64_t D, T* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = x[r * ls + d * ds];
}

template <typename T>
void one_head(const AttentionMassParams& p, const CpuContext& ctx, int64_t b, int64_t h,
              Scratch<T>& s) {
  const int64_t L = p.seq_len, D = p.head_dim;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const bool* mask = p.key_padding_mask ? p.key_padding_mask + b * L : nullptr;
  auto real = [&](int64_t i) { return mask == nullptr || mask[i]; };
  int64_t n_real = 0;
  for (int64_t i = 0; i < L; ++i) n_real += real(i) ? 1 : 0;

  const Strides4 &qs = p.q_stride, &ks = p.k_stride;
  const T* qb = static_cast<const T*>(p.q) + b * qs.b + h * qs.h;
  const T* lb = static_cast<const T*>(p.lse) + (b * p.heads + h) * L;
  const T* sk =
      p.sink_k ? static_cast<const T*>(p.sink_k) + b * p.sink_batch_stride + hk * D : nullptr;
  const T* sink_logit = static_cast<const T*>(p.sink_logit);
  gather_rows(static_cast<const T*>(p.k) + b * ks.b + hk * ks.h, ks.l, ks.d, L, D, s.k.data());
  s.acc.assign(L, 0.0);
  double sink_acc = 0.0;
  const GemmFn<T> gemm = ctx.gemm<T>();

  for (int64_t i0 = 0; i0 < L; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, L - i0);
    gather_rows(qb + i0 * qs.l, qs.l, qs.d, m, D, s.q.data());
    for (int64_t r = 0; r < m; ++r) {  // the sink is one more key, and the logit sink one more
      if (!real(i0 + r)) continue;
      const double lse_i = static_cast<double>(lb[i0 + r]);
      if (sk != nullptr) {
        const T dot = row::dot(s.q.data() + r * D, sk, D);
        sink_acc += std::exp(static_cast<double>(dot * static_cast<T>(p.scale)) - lse_i);
      }
      if (sink_logit != nullptr) sink_acc += std::exp(static_cast<double>(sink_logit[h]) - lse_i);
    }
    for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
      const int64_t n = std::min(kKeyBlock, L - j0);
      T* scores = s.scores.data();
      gemm(false, true, m, n, D, static_cast<T>(p.scale), s.q.data(), D, s.k.data() + j0 * D, D,
           T(0), scores, n);
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

template <typename T>
void all_heads(const AttentionMassParams& p, const CpuContext& ctx) {
  ctx.parallel_for(p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s;
    s.k.resize(p.seq_len * p.head_dim);
    s.q.resize(kQueryBlock * p.head_dim);
    s.scores.resize(kQueryBlock * kKeyBlock);
    s.block_sum.resize(kKeyBlock);
    for (int64_t bh = begin; bh < end; ++bh) one_head(p, ctx, bh / p.heads, bh % p.heads, s);
  });
}

}  // namespace

bool attention_mass_cpu(const AttentionMassParams& p, const CpuContext& ctx) {
  if (!valid(p)) return false;
  if (p.dtype == ScalarType::kFloat64)
    all_heads<double>(p, ctx);
  else
    all_heads<float>(p, ctx);
  return true;
}

}  // namespace sinkdlm
