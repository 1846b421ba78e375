#include "analysis/attention_mass_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace sinkdlm {
namespace {

constexpr int64_t kKeyTile = 64;  // keys per tile: the tile's K rows stay in L1 across query rows

bool valid(const AttentionMassParams& p) {
  return p.q && p.k && p.lse && p.mass && p.sink_mass &&
         (p.dtype == ScalarType::kFloat32 || p.dtype == ScalarType::kFloat64) && p.batch >= 0 &&
         p.heads > 0 && p.kv_heads > 0 && p.heads % p.kv_heads == 0 && p.seq_len >= 0 &&
         p.head_dim > 0;
}

template <typename T>
void one_head(const AttentionMassParams& p, int64_t b, int64_t h, std::vector<T>& k_tile,
              std::vector<T>& q_row, std::vector<double>& acc) {
  const int64_t L = p.seq_len, D = p.head_dim;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const bool* mask = p.key_padding_mask ? p.key_padding_mask + b * L : nullptr;
  auto real = [&](int64_t i) { return mask == nullptr || mask[i]; };
  int64_t n_real = 0;
  for (int64_t i = 0; i < L; ++i) n_real += real(i) ? 1 : 0;

  const Strides4 &qs = p.q_stride, &ks = p.k_stride;
  const T* qb = static_cast<const T*>(p.q) + b * qs.b + h * qs.h;
  const T* kb = static_cast<const T*>(p.k) + b * ks.b + hk * ks.h;
  const T* lb = static_cast<const T*>(p.lse) + (b * p.heads + h) * L;
  const T* sink_logit = static_cast<const T*>(p.sink_logit);
  const T scale = static_cast<T>(p.scale);
  acc.assign(L, 0.0);
  double sink_acc = 0.0;

  for (int64_t j0 = 0; j0 < L; j0 += kKeyTile) {
    const int64_t nj = std::min(kKeyTile, L - j0);
    for (int64_t j = 0; j < nj; ++j)
      for (int64_t d = 0; d < D; ++d) k_tile[j * D + d] = kb[(j0 + j) * ks.l + d * ks.d];
    for (int64_t i = 0; i < L; ++i) {
      if (!real(i)) continue;
      for (int64_t d = 0; d < D; ++d) q_row[d] = qb[i * qs.l + d * qs.d];
      const double lse_i = static_cast<double>(lb[i]);
      for (int64_t j = 0; j < nj; ++j) {
        const T* kr = k_tile.data() + j * D;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += q_row[d] * kr[d];
        acc[j0 + j] += std::exp(static_cast<double>(dot * scale) - lse_i);
      }
      if (j0 == 0) {  // the sink is one more key: count it once per query row
        if (p.sink_k != nullptr) {
          const T* sk = static_cast<const T*>(p.sink_k) + b * p.sink_batch_stride + hk * D;
          T dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q_row[d] * sk[d];
          sink_acc += std::exp(static_cast<double>(dot * scale) - lse_i);
        }
        if (sink_logit != nullptr) sink_acc += std::exp(static_cast<double>(sink_logit[h]) - lse_i);
      }
    }
  }
  T* out = static_cast<T*>(p.mass) + (b * p.heads + h) * L;
  const double inv = n_real > 0 ? 1.0 / static_cast<double>(n_real) : 0.0;
  for (int64_t j = 0; j < L; ++j) out[j] = real(j) ? static_cast<T>(acc[j] * inv) : T(0);
  static_cast<T*>(p.sink_mass)[b * p.heads + h] = static_cast<T>(sink_acc * inv);
}

template <typename T>
void all_heads(const AttentionMassParams& p, const CpuContext& ctx) {
  ctx.parallel_for(p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> k_tile(kKeyTile * p.head_dim), q_row(p.head_dim);
    std::vector<double> acc;
    for (int64_t bh = begin; bh < end; ++bh)
      one_head(p, bh / p.heads, bh % p.heads, k_tile, q_row, acc);
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
