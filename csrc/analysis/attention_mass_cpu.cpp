#include "analysis/attention_mass_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace sinkdlm {
namespace {

constexpr int64_t kKeyTile = 64;  // keys per tile: the tile's K rows stay in L1 across query rows

template <typename T>
bool valid(const AttentionMassParams<T>& p) {
  return p.q && p.k && p.lse && p.mass && p.sink_mass && p.batch >= 0 && p.heads > 0 &&
         p.kv_heads > 0 && p.heads % p.kv_heads == 0 && p.seq_len >= 0 && p.head_dim > 0;
}

template <typename T>
void one_head(const AttentionMassParams<T>& p, int64_t b, int64_t h, std::vector<T>& k_tile,
              std::vector<T>& q_row, std::vector<double>& acc) {
  const int64_t L = p.seq_len, D = p.head_dim;
  const int64_t hk = h / (p.heads / p.kv_heads);
  auto real = [&](int64_t i) {
    return p.key_padding_mask == nullptr ||
           p.key_padding_mask[b * p.mask_stride[0] + i * p.mask_stride[1]];
  };
  int64_t n_real = 0;
  for (int64_t i = 0; i < L; ++i) n_real += real(i) ? 1 : 0;

  const T* qb = p.q + b * p.q_stride[0] + h * p.q_stride[1];
  const T* kb = p.k + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* lb = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
  const T scale = static_cast<T>(p.scale);
  acc.assign(L, 0.0);
  double sink_acc = 0.0;

  for (int64_t j0 = 0; j0 < L; j0 += kKeyTile) {
    const int64_t nj = std::min(kKeyTile, L - j0);
    for (int64_t j = 0; j < nj; ++j)
      for (int64_t d = 0; d < D; ++d)
        k_tile[j * D + d] = kb[(j0 + j) * p.k_stride[2] + d * p.k_stride[3]];
    for (int64_t i = 0; i < L; ++i) {
      if (!real(i)) continue;
      for (int64_t d = 0; d < D; ++d) q_row[d] = qb[i * p.q_stride[2] + d * p.q_stride[3]];
      const double lse_i = static_cast<double>(lb[i * p.lse_stride[2]]);
      for (int64_t j = 0; j < nj; ++j) {
        const T* kr = k_tile.data() + j * D;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += q_row[d] * kr[d];
        acc[j0 + j] += std::exp(static_cast<double>(dot * scale) - lse_i);
      }
      if (j0 == 0) {  // the sink is one more key: count it once per query row
        if (p.sink_k != nullptr) {
          const T* sk = p.sink_k + b * p.sink_k_stride[0] + hk * p.sink_k_stride[1];
          T dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q_row[d] * sk[d * p.sink_k_stride[2]];
          sink_acc += std::exp(static_cast<double>(dot * scale) - lse_i);
        }
        if (p.sink_logit != nullptr)
          sink_acc += std::exp(static_cast<double>(p.sink_logit[h * p.sink_logit_stride]) - lse_i);
      }
    }
  }
  T* out = p.mass + (b * p.heads + h) * L;
  const double inv = n_real > 0 ? 1.0 / static_cast<double>(n_real) : 0.0;
  for (int64_t j = 0; j < L; ++j) out[j] = real(j) ? static_cast<T>(acc[j] * inv) : T(0);
  p.sink_mass[b * p.heads + h] = static_cast<T>(sink_acc * inv);
}

}  // namespace

template <typename T>
bool attention_mass_cpu(const AttentionMassParams<T>& p, int64_t bh_begin, int64_t bh_end) {
  if (!valid(p) || bh_begin < 0 || bh_end > p.batch * p.heads) return false;
  std::vector<T> k_tile(kKeyTile * p.head_dim), q_row(p.head_dim);
  std::vector<double> acc;
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    one_head(p, bh / p.heads, bh % p.heads, k_tile, q_row, acc);
  }
  return true;
}

template bool attention_mass_cpu<float>(const AttentionMassParams<float>&, int64_t, int64_t);
template bool attention_mass_cpu<double>(const AttentionMassParams<double>&, int64_t, int64_t);

}  // namespace sinkdlm
