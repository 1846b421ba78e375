#include "sink_attention/sink_merge_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common/half.h"
#include "common/target_clones.h"
#include "common/vector_cpu.h"

namespace sinkdlm {
namespace {

using namespace vec;

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

// Row (b, h, i) of a (B, H, L, D) tensor.
template <typename T>
T* row_ptr(T* x, const Strides4& st, int64_t b, int64_t h, int64_t i) {
  return x + b * st.b + h * st.h + i * st.l;
}

// The merge is O(D) work per row, so its loops are written out in vectors (16-bit rows converted
// in registers, exp and log by polynomial) and inlined into one function per instruction set:
// called row by row, out-of-line helpers and libm would cost more than the arithmetic. float64
// keeps plain loops and std::exp.
// sum_d x[d] * y[d].
template <typename A, typename T, typename U>
SINKDLM_INLINE A dot(const T* x, const U* y, int64_t n) {
  int64_t d = 0;
  A s = 0;
  if constexpr (std::is_same_v<A, float>) {
    vfloat acc{};
    for (; d + kLanes <= n; d += kLanes) acc += load16(x + d) * load16(y + d);
    s = hsum_tree(acc);
  }
  for (; d < n; ++d) s += load<A>(x[d]) * load<A>(y[d]);
  return s;
}

// out[d] = a * x[d] + b * y[d] (y null: the first term alone); out may be x.
template <typename A, typename T>
SINKDLM_INLINE void scale_add(const T* x, A a, const A* y, A b, T* out, int64_t n) {
  int64_t d = 0;
  if constexpr (std::is_same_v<A, float>) {
    for (; d + kLanes <= n; d += kLanes)
      store16(out + d, y ? load16(x + d) * a + vload(y + d) * b : load16(x + d) * a);
  }
  for (; d < n; ++d) out[d] = store<T>(load<A>(x[d]) * a + (y ? b * y[d] : A(0)));
}

// y[d] += a * x[d].
template <typename A, typename T>
SINKDLM_INLINE void axpy(A a, const T* x, A* y, int64_t n) {
  int64_t d = 0;
  if constexpr (std::is_same_v<A, float>) {
    for (; d + kLanes <= n; d += kLanes) vstore(y + d, vload(y + d) + load16(x + d) * a);
  }
  for (; d < n; ++d) y[d] += a * load<A>(x[d]);
}

// The rows are taken kBlock at a time, so that their per-row scalars (the exps, the log) run
// as one vector across the block; n <= kBlock rows are live in the arrays below.
constexpr int64_t kBlock = kLanes;

// e = exp(x), over a block.
template <typename A>
SINKDLM_INLINE void exp_block(const A* x, A* e) {
  if constexpr (std::is_same_v<A, float>) {
    vstore(e, fast_exp(vload(x)));
  } else {
    for (int64_t j = 0; j < kBlock; ++j) e[j] = std::exp(x[j]);
  }
}

// The forward's scalars of a block: from the token lse, the sink score s and the logit sink lam
// of each row, lse' = log(e^lse + e^s + e^lam) and the weights of the token attention and of the
// sink value. -inf terms drop out; all three -inf (no key seen at all) give lse' = -inf and NaN
// weights, as a dense softmax over nothing does.
template <typename A>
struct FwdBlock {
  alignas(64) A lse_tok[kBlock], s[kBlock], lam[kBlock];     // in
  alignas(64) A lse[kBlock], w_tok[kBlock], w_sink[kBlock];  // out
};

template <typename A>
SINKDLM_INLINE void fwd_block_weights(FwdBlock<A>& k) {
  if constexpr (std::is_same_v<A, float>) {
    const vfloat lt = vload(k.lse_tok), s = vload(k.s), lam = vload(k.lam);
    const vfloat m0 = lt > s ? lt : s, m = m0 > lam ? m0 : lam;
    const vfloat e_tok = fast_exp(lt - m), e_sink = fast_exp(s - m);
    const vfloat sum = e_tok + e_sink + fast_exp(lam - m), inv = 1.0f / sum;
    vstore(k.w_tok, e_tok * inv);
    vstore(k.w_sink, e_sink * inv);
    const vfloat lse = m + fast_log(sum);
    vstore(k.lse, m == kNegInf<float> ? m : lse);
  } else {
    for (int64_t j = 0; j < kBlock; ++j) {
      const A m = std::max({k.lse_tok[j], k.s[j], k.lam[j]});
      const A e_tok = std::exp(k.lse_tok[j] - m), e_sink = std::exp(k.s[j] - m);
      const A sum = e_tok + e_sink + std::exp(k.lam[j] - m);
      k.w_tok[j] = e_tok / sum, k.w_sink[j] = e_sink / sum;
      k.lse[j] = m == kNegInf<A> ? m : m + std::log(sum);
    }
  }
}

// (b, h, i) of row r of a (B, H, L) grid, and a step to the next row (no division per row).
struct RowIndex {
  int64_t b, h, i;
  RowIndex(int64_t r, int64_t H, int64_t L) : b(r / (H * L)), h((r / L) % H), i(r % L) {}
  void next(int64_t H, int64_t L) {
    if (++i < L) return;
    i = 0;
    if (++h == H) h = 0, ++b;
  }
};

// Rows [begin, end) of the forward merge, a block at a time: the sink scores, the block's
// weights as one vector, then each row's out = w_tok * attn_out + w_sink * sink_v.
template <typename T, typename A>
SINKDLM_INLINE void merge_fwd_rows_impl(const SinkMergeParams<T, A>& p, int64_t begin,
                                        int64_t end) {
  const int64_t H = p.heads, L = p.seq_len, D = p.head_dim, group = p.heads / p.kv_heads;
  RowIndex at(begin, H, L);
  FwdBlock<A> k;
  const T* attn[kBlock];
  T* out[kBlock];
  const A* sink_v[kBlock];
  bool real[kBlock];
  for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
    const int64_t n = std::min(kBlock, end - r0);
    for (int64_t j = 0; j < kBlock; ++j, at.next(H, L)) {
      k.lse_tok[j] = k.s[j] = k.lam[j] = 0;  // lanes past n: any finite value
      if (j >= n) continue;
      const int64_t b = at.b, h = at.h, i = at.i, hk = h / group;
      attn[j] = row_ptr(p.attn_out, p.attn_out_stride, b, h, i);
      out[j] = row_ptr(p.out, p.out_stride, b, h, i);
      real[j] = p.row_mask == nullptr || p.row_mask[b * L + i];
      const A* sk = p.sink_k ? p.sink_k + b * p.sink_batch_stride + hk * D : nullptr;
      sink_v[j] = p.sink_v ? p.sink_v + b * p.sink_batch_stride + hk * D : nullptr;
      k.s[j] = sk ? p.scale * dot<A>(row_ptr(p.q, p.q_stride, b, h, i), sk, D) : kNegInf<A>;
      k.lam[j] = p.sink_logit ? p.sink_logit[h] : kNegInf<A>;
      k.lse_tok[j] =
          p.attn_lse[b * p.attn_lse_stride.b + h * p.attn_lse_stride.h + i * p.attn_lse_stride.l];
    }
    fwd_block_weights(k);
    for (int64_t j = 0; j < n; ++j) {
      if (real[j]) {
        scale_add(attn[j], k.w_tok[j], sink_v[j], k.w_sink[j], out[j], D);
      } else {
        std::fill(out[j], out[j] + D, store<T>(A(0)));
      }
      p.lse[r0 + j] = real[j] ? k.lse[j] : A(0);
    }
  }
}

// The backward's scalars of a block of rows: from the merged lse, the sink score s = scale q .
// sink_k, dO . sink_v, delta = dO . out and dlse g, the sink's probability and ds.
template <typename A>
struct BwdBlock {
  alignas(64) A s_minus_lse[kBlock], do_sv[kBlock], delta[kBlock], g[kBlock];  // in
  alignas(64) A prob[kBlock], ds[kBlock];                                      // out
};

template <typename A>
SINKDLM_INLINE void bwd_block_terms(BwdBlock<A>& k) {
  exp_block(k.s_minus_lse, k.prob);
  for (int64_t j = 0; j < kBlock; ++j) k.ds[j] = k.prob[j] * (k.do_sv[j] - k.delta[j] + k.g[j]);
}

// The sink's gradient terms of one (b, h): adds to dq, accumulates the head's dsink_k / dsink_v
// partial sums into pk / pv (null without a sink token) and returns its dsink_logit part.
template <typename T, typename A>
SINKDLM_INLINE A merge_bwd_head_impl(const SinkMergeBwdParams<T, A>& p, int64_t bh, A* pk, A* pv) {
  const int64_t H = p.heads, L = p.seq_len, D = p.head_dim, group = H / p.kv_heads;
  const int64_t b = bh / H, h = bh % H, hk = h / group;
  const bool token = p.sink_k != nullptr, logit = p.sink_logit != nullptr;
  const A* sk = token ? p.sink_k + b * p.sink_batch_stride + hk * D : nullptr;
  const A* sv = token ? p.sink_v + b * p.sink_batch_stride + hk * D : nullptr;
  const A* lse = p.lse + bh * L;
  BwdBlock<A> k;
  alignas(64) A logit_arg[kBlock], logit_prob[kBlock];
  bool real[kBlock];
  A pl = 0;
  for (int64_t i0 = 0; i0 < L; i0 += kBlock) {
    const int64_t n = std::min(kBlock, L - i0);
    for (int64_t j = 0; j < kBlock; ++j) {
      k.s_minus_lse[j] = k.do_sv[j] = k.delta[j] = k.g[j] = logit_arg[j] = 0;
      if (j >= n) continue;
      const int64_t i = i0 + j;
      real[j] = p.row_mask == nullptr || p.row_mask[b * L + i];
      if (!real[j]) continue;
      const T* doi = row_ptr(p.dout, p.dout_stride, b, h, i);
      k.delta[j] = dot<A>(doi, row_ptr(p.out, p.out_stride, b, h, i), D);
      k.g[j] = p.dlse != nullptr ? p.dlse[bh * L + i] : A(0);
      if (token) {
        k.s_minus_lse[j] = p.scale * dot<A>(row_ptr(p.q, p.q_stride, b, h, i), sk, D) - lse[i];
        k.do_sv[j] = dot<A>(doi, sv, D);
      }
      if (logit) logit_arg[j] = p.sink_logit[h] - lse[i];
    }
    if (token) {
      bwd_block_terms(k);
      for (int64_t j = 0; j < n; ++j) {
        if (!real[j]) continue;
        const int64_t i = i0 + j;
        const T* qi = row_ptr(p.q, p.q_stride, b, h, i);
        axpy(k.prob[j], row_ptr(p.dout, p.dout_stride, b, h, i), pv, D);
        axpy(p.scale * k.ds[j], qi, pk, D);
        T* dqi = row_ptr(p.dq, p.dq_stride, b, h, i);
        scale_add(dqi, A(1), sk, p.scale * k.ds[j], dqi, D);
      }
    }
    if (logit) {
      exp_block(logit_arg, logit_prob);
      for (int64_t j = 0; j < n; ++j)
        if (real[j]) pl += logit_prob[j] * (k.g[j] - k.delta[j]);
    }
  }
  return pl;
}

}  // namespace

// One function per storage type, each compiled per instruction set (templates cannot be cloned).
#define SINKDLM_MERGE_ROWS(T, A)                                                    \
  SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA)                                           \
  void merge_fwd_rows(const SinkMergeParams<T, A>& p, int64_t begin, int64_t end) { \
    merge_fwd_rows_impl(p, begin, end);                                             \
  }                                                                                 \
  SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA)                                           \
  A merge_bwd_head(const SinkMergeBwdParams<T, A>& p, int64_t bh, A* pk, A* pv) {   \
    return merge_bwd_head_impl(p, bh, pk, pv);                                      \
  }
SINKDLM_MERGE_ROWS(float, float)
SINKDLM_MERGE_ROWS(double, double)
SINKDLM_MERGE_ROWS(float16, float)
SINKDLM_MERGE_ROWS(bfloat16, float)
#undef SINKDLM_MERGE_ROWS

namespace {

void require_unit_last_stride(bool unit) {
  if (!unit)
    throw std::invalid_argument(
        "sink merge: q, attn_out / out, dout and dq need a unit last-dimension stride");
}

}  // namespace

template <typename T, typename A>
void sink_merge_fwd_cpu(const SinkMergeParams<T, A>& p, const CpuContext& ctx) {
  require_unit_last_stride(p.q_stride.d == 1 && p.attn_out_stride.d == 1 && p.out_stride.d == 1);
  // Each row is O(D) work: chunks of a few hundred rows keep the threads' overhead small.
  ctx.parallel_for(p.batch * p.heads * p.seq_len, /*grain=*/256,
                   [&](int64_t begin, int64_t end) { merge_fwd_rows(p, begin, end); });
}

template <typename T, typename A>
void sink_merge_bwd_cpu(const SinkMergeBwdParams<T, A>& p, const CpuContext& ctx) {
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, D = p.head_dim;
  const int64_t group = H / Hkv;
  const bool token = p.sink_k != nullptr, logit = p.sink_logit != nullptr;
  if (!token && !logit) return;
  require_unit_last_stride(p.q_stride.d == 1 && p.dout_stride.d == 1 && p.out_stride.d == 1 &&
                           p.dq_stride.d == 1);
  // One partial sum per (b, h), each summed over its rows in order by one thread, then reduced
  // over heads (and the batch) in order below: the result does not depend on the thread count.
  std::vector<A> part_k(token ? B * H * D : 0), part_v(token ? B * H * D : 0);
  std::vector<A> part_logit(logit ? B * H : 0);
  ctx.parallel_for(B * H, /*grain=*/1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      A* pk = token ? part_k.data() + bh * D : nullptr;
      A* pv = token ? part_v.data() + bh * D : nullptr;
      const A pl = merge_bwd_head(p, bh, pk, pv);
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
