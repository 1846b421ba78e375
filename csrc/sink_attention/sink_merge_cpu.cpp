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

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Row i of head (b, h) of a (B, H, L, D) tensor.
template <typename T>
T* row_ptr(const void* x, const Strides4& st, int64_t b, int64_t h, int64_t i) {
  return static_cast<T*>(const_cast<void*>(x)) + b * st.b + h * st.h + i * st.l;
}

template <typename T>
void fwd(const SinkMergeParams& p, const CpuContext& ctx) {
  using A = typename AccOf<T>::type;
  const int64_t H = p.heads, L = p.seq_len, D = p.head_dim, group = p.heads / p.kv_heads;
  const A scale = static_cast<A>(p.scale);
  const A* sink_k = static_cast<const A*>(p.sink_k);
  const A* sink_v = static_cast<const A*>(p.sink_v);
  const A* sink_logit = static_cast<const A*>(p.sink_logit);
  const A* attn_lse = static_cast<const A*>(p.attn_lse);
  A* lse_out = static_cast<A*>(p.lse);
  ctx.parallel_for(p.batch * H * L, /*grain=*/64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * L), h = (r / L) % H, i = r % L;
      T* o = row_ptr<T>(p.out, p.out_stride, b, h, i);
      const int64_t os = p.out_stride.d;
      if (p.key_padding_mask != nullptr && !p.key_padding_mask[b * L + i]) {
        for (int64_t d = 0; d < D; ++d) o[d * os] = store<T>(A(0));
        lse_out[r] = 0;
        continue;
      }
      const int64_t hk = h / group;
      const T* qi = row_ptr<const T>(p.q, p.q_stride, b, h, i);
      const A* sk = sink_k ? sink_k + b * p.sink_batch_stride + hk * D : nullptr;
      const A* sv = sink_v ? sink_v + b * p.sink_batch_stride + hk * D : nullptr;
      A s = kNegInf<A>;
      if (sk != nullptr) {
        A dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += load<A>(qi[d * p.q_stride.d]) * sk[d];
        s = scale * dot;
      }
      const A lam = sink_logit ? sink_logit[h] : kNegInf<A>;
      const A lse_tok = attn_lse[r];
      const A lse = log_add_exp3(lse_tok, s, lam);
      const A w_tok = std::exp(lse_tok - lse);
      const A w_sink = sk != nullptr ? std::exp(s - lse) : A(0);
      const T* ai = row_ptr<const T>(p.attn_out, p.attn_out_stride, b, h, i);
      for (int64_t d = 0; d < D; ++d) {  // each element read before it is written (aliasing)
        const A tok = load<A>(ai[d * p.attn_out_stride.d]) * w_tok;
        o[d * os] = store<T>(sv != nullptr ? tok + w_sink * sv[d] : tok);
      }
      lse_out[r] = lse;
    }
  });
}

template <typename T>
void bwd(const SinkMergeBwdParams& p, const CpuContext& ctx) {
  using A = typename AccOf<T>::type;
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, L = p.seq_len, D = p.head_dim;
  const int64_t group = H / Hkv;
  const A scale = static_cast<A>(p.scale);
  const A* sink_k = static_cast<const A*>(p.sink_k);
  const A* sink_v = static_cast<const A*>(p.sink_v);
  const A* sink_logit = static_cast<const A*>(p.sink_logit);
  const A* lse_in = static_cast<const A*>(p.lse);
  const A* dlse = static_cast<const A*>(p.dlse);
  const bool token = sink_k != nullptr, logit = sink_logit != nullptr;
  if (!token && !logit) return;
  // One partial sum per (b, h), each summed over its rows in order by one thread, then reduced
  // over heads (and the batch) in order below: the result does not depend on the thread count.
  std::vector<A> part_k(token ? B * H * D : 0), part_v(token ? B * H * D : 0);
  std::vector<A> part_logit(logit ? B * H : 0);
  ctx.parallel_for(B * H, /*grain=*/1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      const A* sk = token ? sink_k + b * p.sink_batch_stride + hk * D : nullptr;
      const A* sv = token ? sink_v + b * p.sink_batch_stride + hk * D : nullptr;
      A* pk = token ? part_k.data() + bh * D : nullptr;
      A* pv = token ? part_v.data() + bh * D : nullptr;
      A pl = 0;
      for (int64_t i = 0; i < L; ++i) {
        if (p.key_padding_mask != nullptr && !p.key_padding_mask[b * L + i]) continue;
        const T* qi = row_ptr<const T>(p.q, p.q_stride, b, h, i);
        const T* doi = row_ptr<const T>(p.dout, p.dout_stride, b, h, i);
        const T* oi = row_ptr<const T>(p.out, p.out_stride, b, h, i);
        const A lse = lse_in[bh * L + i];
        const A g = dlse != nullptr ? dlse[bh * L + i] : A(0);
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
          const A prob = std::exp(scale * q_sk - lse);
          const A ds = prob * (do_sv - delta + g);
          T* dqi = row_ptr<T>(p.dq, p.dq_stride, b, h, i);
          for (int64_t d = 0; d < D; ++d) {
            pv[d] += prob * load<A>(doi[d * p.dout_stride.d]);
            pk[d] += scale * ds * load<A>(qi[d * p.q_stride.d]);
            T& dq = dqi[d * p.dq_stride.d];
            dq = store<T>(load<A>(dq) + scale * ds * sk[d]);
          }
        }
        if (logit) pl += std::exp(sink_logit[h] - lse) * (g - delta);
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
        A* dk = static_cast<A*>(p.dsink_k) + o * D;
        A* dv = static_cast<A*>(p.dsink_v) + o * D;
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
      static_cast<A*>(p.dsink_logit)[h] = sum;
    }
}

template <template <typename> class Fn, typename P>
void dispatch(const P& p, const CpuContext& ctx) {
  switch (p.dtype) {
    case ScalarType::kFloat32:
      return Fn<float>::run(p, ctx);
    case ScalarType::kFloat64:
      return Fn<double>::run(p, ctx);
    case ScalarType::kFloat16:
      return Fn<float16>::run(p, ctx);
    case ScalarType::kBFloat16:
      return Fn<bfloat16>::run(p, ctx);
  }
}

template <typename T>
struct Fwd {
  static void run(const SinkMergeParams& p, const CpuContext& ctx) { fwd<T>(p, ctx); }
};
template <typename T>
struct Bwd {
  static void run(const SinkMergeBwdParams& p, const CpuContext& ctx) { bwd<T>(p, ctx); }
};

}  // namespace

void sink_merge_fwd_cpu(const SinkMergeParams& p, const CpuContext& ctx) { dispatch<Fwd>(p, ctx); }

void sink_merge_bwd_cpu(const SinkMergeBwdParams& p, const CpuContext& ctx) {
  dispatch<Bwd>(p, ctx);
}

}  // namespace sinkdlm
