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

template <typename T, typename A>
void sink_merge_fwd_cpu(const SinkMergeParams<T, A>& p, const CpuContext& ctx) {
  const int64_t H = p.heads, L = p.seq_len, D = p.head_dim, group = p.heads / p.kv_heads;
  ctx.parallel_for(p.batch * H * L, /*grain=*/64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * L), h = (r / L) % H, i = r % L;
      T* o = row_ptr(p.out, p.out_stride, b, h, i);
      const int64_t os = p.out_stride.d;
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
        for (int64_t d = 0; d < D; ++d) dot += load<A>(qi[d * p.q_stride.d]) * sk[d];
        s = p.scale * dot;
      }
      const A lam = p.sink_logit ? p.sink_logit[h] : kNegInf<A>;
      const A lse_tok =
          p.attn_lse[b * p.attn_lse_stride.b + h * p.attn_lse_stride.h + i * p.attn_lse_stride.l];
      const A lse = log_add_exp3(lse_tok, s, lam);
      const A w_tok = std::exp(lse_tok - lse);
      const A w_sink = sk != nullptr ? std::exp(s - lse) : A(0);
      const T* ai = row_ptr(p.attn_out, p.attn_out_stride, b, h, i);
      for (int64_t d = 0; d < D; ++d) {
        const A tok = load<A>(ai[d * p.attn_out_stride.d]) * w_tok;
        o[d * os] = store<T>(sv != nullptr ? tok + w_sink * sv[d] : tok);
      }
      p.lse[r] = lse;
    }
  });
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
  ctx.parallel_for(B * H, /*grain=*/1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      const A* sk = token ? p.sink_k + b * p.sink_batch_stride + hk * D : nullptr;
      const A* sv = token ? p.sink_v + b * p.sink_batch_stride + hk * D : nullptr;
      A* pk = token ? part_k.data() + bh * D : nullptr;
      A* pv = token ? part_v.data() + bh * D : nullptr;
      A pl = 0;
      for (int64_t i = 0; i < L; ++i) {
        if (p.row_mask != nullptr && !p.row_mask[b * L + i]) continue;
        const T* qi = row_ptr(p.q, p.q_stride, b, h, i);
        const T* doi = row_ptr(p.dout, p.dout_stride, b, h, i);
        const T* oi = row_ptr(p.out, p.out_stride, b, h, i);
        const A lse = p.lse[bh * L + i];
        const A g = p.dlse != nullptr ? p.dlse[bh * L + i] : A(0);
        A delta = 0, do_sv = 0, q_sk = 0;
        for (int64_t d = 0; d < D; ++d) {
          const A dod = load<A>(doi[d * p.dout_stride.d]);
          delta += dod * load<A>(oi[d * p.out_stride.d]);
          if (token) {
            do_sv += dod * sv[d];
            q_sk += load<A>(qi[d * p.q_stride.d]) * sk[d];
          }
        }
        if (token) {
          const A prob = std::exp(p.scale * q_sk - lse);
          const A ds = prob * (do_sv - delta + g);
          T* dqi = row_ptr(p.dq, p.dq_stride, b, h, i);
          for (int64_t d = 0; d < D; ++d) {
            pv[d] += prob * load<A>(doi[d * p.dout_stride.d]);
            pk[d] += p.scale * ds * load<A>(qi[d * p.q_stride.d]);
            T& dq = dqi[d * p.dq_stride.d];
            dq = store<T>(load<A>(dq) + p.scale * ds * sk[d]);
          }
        }
        if (logit) pl += std::exp(p.sink_logit[h] - lse) * (g - delta);
      }
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
