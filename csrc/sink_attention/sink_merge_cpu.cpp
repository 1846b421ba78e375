#include "sink_attention/sink_merge_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/half.h"

namespace sinkdlm {
namespace {

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

// log(e^a + e^b + e^c); -inf terms drop out.
template <typename A>
A log_add_exp3(A a, A b, A c) {
  const A m = std::max({a, b, c});
  if (m == kNegInf<A>) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m) + std::exp(c - m));
}

// Row (b, h, i) of a (B, H, L, D) tensor.
template <typename T>
T* row_ptr(T* x, const Strides4& st, int64_t b, int64_t h, int64_t i) {
  return x + b * st.b + h * st.h + i * st.l;
}

}  // namespace

// Rows [begin, end) of the forward merge. kUnit: q, attn_out and out have unit last-dim strides
// (the usual case), so the loops over d are plain and vectorise.
template <bool kUnit, typename T, typename A>
void merge_fwd_rows(const SinkMergeParams<T, A>& p, int64_t begin, int64_t end) {
  const int64_t H = p.heads, L = p.seq_len, D = p.head_dim, group = p.heads / p.kv_heads;
  const int64_t qs = kUnit ? 1 : p.q_stride.d, as = kUnit ? 1 : p.attn_out_stride.d;
  const int64_t os = kUnit ? 1 : p.out_stride.d;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / (H * L), h = (r / L) % H, i = r % L;
    T* o = row_ptr(p.out, p.out_stride, b, h, i);
    if (p.row_mask != nullptr && !p.row_mask[b * L + i]) {
      for (int64_t d = 0; d < D; ++d) o[d * os] = store<T>(A(0));
      p.lse[r] = 0;
      continue;
    }
    const int64_t hk = h / group;
    const T* qi = row_ptr(p.q, p.q_stride, b, h, i);
    const A* sk = p.sink_k ? p.sink_k + b * p.sink_batch_stride + hk * D : nullptr;
    const A* sv = p.sink_v ? p.sink_v + b * p.sink_batch_stride + hk * D : nullptr;
    A s = kNegInf<A>;
    if (sk != nullptr) {
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += load<A>(qi[d * qs]) * sk[d];
      s = p.scale * dot;
    }
    const A lam = p.sink_logit ? p.sink_logit[h] : kNegInf<A>;
    const A lse_tok =
        p.attn_lse[b * p.attn_lse_stride.b + h * p.attn_lse_stride.h + i * p.attn_lse_stride.l];
    const A lse = log_add_exp3(lse_tok, s, lam);
    const A w_tok = std::exp(lse_tok - lse);
    const T* ai = row_ptr(p.attn_out, p.attn_out_stride, b, h, i);
    if (sv != nullptr) {
      const A w_sink = std::exp(s - lse);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        o[d * os] = store<T>(load<A>(ai[d * as]) * w_tok + w_sink * sv[d]);
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d * os] = store<T>(load<A>(ai[d * as]) * w_tok);
    }
    p.lse[r] = lse;
  }
}

template <typename T, typename A>
void sink_merge_fwd_cpu(const SinkMergeParams<T, A>& p, const CpuContext& ctx) {
  const bool unit = p.q_stride.d == 1 && p.attn_out_stride.d == 1 && p.out_stride.d == 1;
  // Each row is O(D) work: chunks of a few hundred rows keep the threads' overhead small.
  ctx.parallel_for(p.batch * p.heads * p.seq_len, /*grain=*/256, [&](int64_t begin, int64_t end) {
    unit ? merge_fwd_rows<true>(p, begin, end) : merge_fwd_rows<false>(p, begin, end);
  });
}

// The sink's gradient terms of one (b, h): adds to dq, accumulates the head's dsink_k / dsink_v
// partial sums into pk / pv (null without a sink token) and returns its dsink_logit part. kUnit
// as for the forward (q, dout, out and dq with unit last-dim strides).
template <bool kUnit, typename T, typename A>
A merge_bwd_head(const SinkMergeBwdParams<T, A>& p, int64_t bh, A* pk, A* pv) {
  const int64_t H = p.heads, L = p.seq_len, D = p.head_dim, group = H / p.kv_heads;
  const int64_t b = bh / H, h = bh % H, hk = h / group;
  const bool token = p.sink_k != nullptr, logit = p.sink_logit != nullptr;
  const int64_t qs = kUnit ? 1 : p.q_stride.d, dos = kUnit ? 1 : p.dout_stride.d;
  const int64_t os = kUnit ? 1 : p.out_stride.d, dqs = kUnit ? 1 : p.dq_stride.d;
  const A* sk = token ? p.sink_k + b * p.sink_batch_stride + hk * D : nullptr;
  const A* sv = token ? p.sink_v + b * p.sink_batch_stride + hk * D : nullptr;
  A pl = 0;
  for (int64_t i = 0; i < L; ++i) {
    if (p.row_mask != nullptr && !p.row_mask[b * L + i]) continue;
    const T* qi = row_ptr(p.q, p.q_stride, b, h, i);
    const T* doi = row_ptr(p.dout, p.dout_stride, b, h, i);
    const T* oi = row_ptr(p.out, p.out_stride, b, h, i);
    const A lse = p.lse[bh * L + i];
    const A g = p.dlse != nullptr ? p.dlse[bh * L + i] : A(0);
    A delta = 0;
#pragma omp simd reduction(+ : delta)
    for (int64_t d = 0; d < D; ++d) delta += load<A>(doi[d * dos]) * load<A>(oi[d * os]);
    if (token) {
      A do_sv = 0, q_sk = 0;
#pragma omp simd reduction(+ : do_sv, q_sk)
      for (int64_t d = 0; d < D; ++d) {
        do_sv += load<A>(doi[d * dos]) * sv[d];
        q_sk += load<A>(qi[d * qs]) * sk[d];
      }
      const A prob = std::exp(p.scale * q_sk - lse);
      const A ds = prob * (do_sv - delta + g);
      T* dqi = row_ptr(p.dq, p.dq_stride, b, h, i);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        pv[d] += prob * load<A>(doi[d * dos]);
        pk[d] += p.scale * ds * load<A>(qi[d * qs]);
        T& dq = dqi[d * dqs];
        dq = store<T>(load<A>(dq) + p.scale * ds * sk[d]);
      }
    }
    if (logit) pl += std::exp(p.sink_logit[h] - lse) * (g - delta);
  }
  return pl;
}

template <typename T, typename A>
void sink_merge_bwd_cpu(const SinkMergeBwdParams<T, A>& p, const CpuContext& ctx) {
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, L = p.seq_len, D = p.head_dim;
  const int64_t group = H / Hkv;
  const bool token = p.sink_k != nullptr, logit = p.sink_logit != nullptr;
  if (!token && !logit) return;
  // One partial sum per (b, h), each summed over its rows in order by one thread, then reduced
  // over heads (and the batch) in order below: the result does not depend on the thread count.
  std::vector<A> part_k(token ? B * H * D : 0), part_v(token ? B * H * D : 0);
  std::vector<A> part_logit(logit ? B * H : 0);
  const bool unit =
      p.q_stride.d == 1 && p.dout_stride.d == 1 && p.out_stride.d == 1 && p.dq_stride.d == 1;
  ctx.parallel_for(B * H, /*grain=*/1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      A* pk = token ? part_k.data() + bh * D : nullptr;
      A* pv = token ? part_v.data() + bh * D : nullptr;
      const A pl =
          unit ? merge_bwd_head<true>(p, bh, pk, pv) : merge_bwd_head<false>(p, bh, pk, pv);
      if (logit) part_logit[bh] = pl;
    }
  });
  if (token) {
    const bool shared = p.sink_batch_stride == 0;
    const int64_t n_out = shared ? Hkv : B * Hkv;
    ctx.parallel_for(n_out, /*grain=*/1, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        const int64_t hk = o % Hkv;
        A* dk = p.dsink_k + o * D;
        A* dv = p.dsink_v + o * D;
        std::fill(dk, dk + D, A(0));
        std::fill(dv, dv + D, A(0));
        const int64_t b_begin = shared ? 0 : o / Hkv, b_end = shared ? B : b_begin + 1;
        for (int64_t b = b_begin; b < b_end; ++b)
          for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
            for (int64_t d = 0; d < D; ++d) {
              dk[d] += part_k[(b * H + h) * D + d];
              dv[d] += part_v[(b * H + h) * D + d];
            }
      }
    });
  }
  if (logit)
    for (int64_t h = 0; h < H; ++h) {
      A sum = 0;
      for (int64_t b = 0; b < B; ++b) sum += part_logit[b * H + h];
      p.dsink_logit[h] = sum;
    }
}

#define SINKDLM_INSTANTIATE_SINK_MERGE(T, A)                                               \
  template void sink_merge_fwd_cpu<T, A>(const SinkMergeParams<T, A>&, const CpuContext&); \
  template void sink_merge_bwd_cpu<T, A>(const SinkMergeBwdParams<T, A>&, const CpuContext&);
SINKDLM_INSTANTIATE_SINK_MERGE(float, float)
SINKDLM_INSTANTIATE_SINK_MERGE(double, double)
SINKDLM_INSTANTIATE_SINK_MERGE(float16, float)
SINKDLM_INSTANTIATE_SINK_MERGE(bfloat16, float)
#undef SINKDLM_INSTANTIATE_SINK_MERGE

}  // namespace sinkdlm
