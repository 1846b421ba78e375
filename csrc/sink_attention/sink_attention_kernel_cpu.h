// The tiled forward and backward of the CPU sink attention, written once for every dtype and
// GEMM policy (sink_attention_gemms_cpu.h): online softmax over key tiles, the sink opening each
// row; with segments (packed documents) a query tile visits only the key tiles of its own
// segments. Included by sink_attention_cpu.cpp only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cpu_context.h"
#include "common/gemm_bf16_cpu.h"
#include "common/half.h"
#include "common/row_ops.h"
#include "sink_attention/sink_attention_gemms_cpu.h"
#include "sink_attention/sink_attention_params.h"

// Unnamed namespace: internal linkage, as if this were written in the one .cpp that includes it,
// so no instantiation is exported from _C.
namespace sinkdlm::sink_attention {
namespace {

template <typename A>
inline constexpr A kNegInf = -std::numeric_limits<A>::infinity();

// Rows [i0, i0 + n) of head (b, h) of a (B, H, L, D) tensor into a dense n x D tile, times mul.
template <typename T, typename A>
void load_tile(const T* x, const Strides4& st, int64_t b, int64_t h, int64_t i0, int64_t n,
               int64_t D, A mul, A* tile) {
  const T* base = x + b * st.b + h * st.h + i0 * st.l;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < D; ++d) tile[r * D + d] = load<A>(base[r * st.l + d * st.d]) * mul;
}

// Masks the columns of padded keys in an n x nk score tile (row stride ld).
template <typename A>
void mask_padded_keys(const bool* key_mask, int64_t j0, int64_t nk, A* s, int64_t n, int64_t ld) {
  if (key_mask == nullptr) return;
  for (int64_t c = 0; c < nk; ++c)
    if (!key_mask[j0 + c])
      for (int64_t r = 0; r < n; ++r) s[r * ld + c] = kNegInf<A>;
}

// Keys [begin, end) of one query tile: with segments, the keys of the segments its queries
// belong to (the only ones any of them sees), the ends moved out to panel edges (the bf16 GEMMs'
// K/V panels start there; end may also be Lk). Without segments, every key.
struct KeyRange {
  int64_t begin, end;
};

KeyRange visible_keys(const int64_t* segments, int64_t i0, int64_t nq, int64_t Lk) {
  if (segments == nullptr) return {0, Lk};
  constexpr int64_t align = bf16::kPanel;
  const int64_t begin = std::lower_bound(segments, segments + Lk, segments[i0]) - segments;
  const int64_t end = std::upper_bound(segments, segments + Lk, segments[i0 + nq - 1]) - segments;
  return {begin / align * align, std::min(Lk, (end + align - 1) / align * align)};
}

// Masks, in an nq x nk score tile (row stride ld) of queries from i0 and keys from j0, the
// keys outside each query's segment; a tile wholly inside one segment is left as it is.
template <typename A>
void mask_other_segments(const int64_t* segments, int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                         A* s, int64_t ld) {
  if (segments == nullptr) return;
  const int64_t* sq = segments + i0;
  const int64_t* sk = segments + j0;
  if (sq[0] == sq[nq - 1] && sk[0] == sq[0] && sk[nk - 1] == sq[0]) return;
  for (int64_t r = 0; r < nq; ++r)
    for (int64_t c = 0; c < nk; ++c)
      if (sk[c] != sq[r]) s[r * ld + c] = kNegInf<A>;
}

// What the forward and the backward share: sizes and the sink of each (batch, kv head) in
// the accumulation type.
template <typename T>
struct Setup {
  using A = typename AccOf<T>::type;
  explicit Setup(const SinkAttentionParams& p)
      : p(p),
        B(p.batch),
        H(p.heads),
        Hkv(p.kv_heads),
        Lq(p.seq_len),
        Lk(p.kv_seq_len),
        D(p.head_dim),
        group(H / Hkv),
        bk(std::min(kBlockK, Lk)),
        scale(static_cast<A>(p.scale)),
        sink_logit(static_cast<const A*>(p.sink_logit)) {}

  const A* sink_k(int64_t b, int64_t hk) const { return sink_row(p.sink_k, b, hk); }
  const A* sink_v(int64_t b, int64_t hk) const { return sink_row(p.sink_v, b, hk); }
  // Null when there is no padding: every key (query) is real.
  const bool* key_mask(int64_t b) const {
    return p.key_padding_mask ? p.key_padding_mask + b * Lk : nullptr;
  }
  const bool* query_mask(int64_t b) const {
    return p.query_padding_mask ? p.query_padding_mask + b * Lq : nullptr;
  }
  // Null without segments (Lq == Lk with them).
  const int64_t* segments(int64_t b) const {
    return p.segment_ids ? p.segment_ids + b * Lq : nullptr;
  }

  const SinkAttentionParams& p;
  const int64_t B, H, Hkv, Lq, Lk, D, group, bk;
  const A scale;
  const A* const sink_logit;

 private:
  const A* sink_row(const void* sink, int64_t b, int64_t hk) const {
    return sink ? static_cast<const A*>(sink) + b * p.sink_batch_stride + hk * D : nullptr;
  }
};

template <typename T, typename Gemms>
void fwd(const SinkAttentionParams& p, const CpuContext& ctx) {
  using A = typename AccOf<T>::type;
  constexpr int64_t bq = Gemms::kBlockQ;
  const Setup<T> st(p);
  const typename Gemms::Shared kv(p, Pass::kForward, ctx);
  const int64_t B = st.B, H = st.H, Lq = st.Lq, Lk = st.Lk, D = st.D, bk = st.bk;
  const A scale = st.scale;
  const auto* sink_logit = st.sink_logit;
  T* out = static_cast<T*>(p.out);
  const Strides4& os = p.out_stride;
  A* lse = static_cast<A*>(p.lse);
  const int64_t q_tiles = (Lq + bq - 1) / bq;

  ctx.parallel_for(B * H * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(bq * D), s(bq * bk), acc(bq * D), m(bq), l(bq);
    typename Gemms::Tile t(kv, bk, D, scale);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * q_tiles), h = (item / q_tiles) % H, hk = h / st.group;
      const int64_t i0 = (item % q_tiles) * bq, nq = std::min(bq, Lq - i0);
      const bool* key_mask = st.key_mask(b);
      const bool* query_mask = st.query_mask(b);
      const int64_t* segments = st.segments(b);
      const KeyRange keys = visible_keys(segments, i0, nq, Lk);
      load_tile(static_cast<const T*>(p.q), p.q_stride, b, h, i0, nq, D, scale, qs.data());
      t.head(b, hk);
      t.set_q(p, b, h, i0, nq, qs.data());

      // The sink opens every row's online softmax: running max, sum and accumulator.
      const A* sk = st.sink_k(b, hk);
      const A* sv = st.sink_v(b, hk);
      for (int64_t r = 0; r < nq; ++r) {
        A* acc_r = acc.data() + r * D;
        std::fill(acc_r, acc_r + D, A(0));
        m[r] = kNegInf<A>;
        l[r] = 0;
        if (sk) {
          m[r] = row::dot(qs.data() + r * D, sk, D);
          l[r] = 1;
          std::copy(sv, sv + D, acc_r);
        }
        // A -inf logit sink (a float16 -7e4 rounds to it) adds e^-inf = 0: skipped, since with
        // no sink token m is -inf too and exp(lam - m) would be NaN.
        if (sink_logit && sink_logit[h] > kNegInf<A>) {
          const A lam = sink_logit[h];
          if (lam > m[r]) {
            const A alpha = std::exp(m[r] - lam);  // 0 when there is no sink token
            row::scale(acc_r, D, alpha);
            l[r] = l[r] * alpha + 1;
            m[r] = lam;
          } else {
            l[r] += std::exp(lam - m[r]);
          }
        }
      }

      for (int64_t j0 = keys.begin; j0 < keys.end; j0 += bk) {
        const int64_t nk = std::min(bk, keys.end - j0);
        t.scores(j0, nk, s.data());
        mask_padded_keys(key_mask, j0, nk, s.data(), nq, bk);
        mask_other_segments(segments, i0, nq, j0, nk, s.data(), bk);
        for (int64_t r = 0; r < nq; ++r) {
          A* s_r = s.data() + r * bk;
          const A m_new = std::max(m[r], row::max(s_r, nk));
          if (m_new == kNegInf<A>) {  // nothing visible yet: contributes nothing
            std::fill(s_r, s_r + nk, A(0));
            continue;
          }
          const A alpha = std::exp(m[r] - m_new);
          l[r] = l[r] * alpha + row::exp_sub_sum(s_r, nk, m_new);
          if (alpha != A(1)) row::scale(acc.data() + r * D, D, alpha);
          m[r] = m_new;
        }
        t.acc_pv(s.data(), j0, nk, acc.data());
      }

      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        T* out_r = out + b * os.b + h * os.h + i * os.l;
        A& lse_r = lse[(b * H + h) * Lq + i];
        const bool padded = query_mask && !query_mask[i];
        if (padded || l[r] == A(0)) {
          for (int64_t d = 0; d < D; ++d) out_r[d * os.d] = store<T>(A(0));
          lse_r = 0;
          continue;
        }
        const A inv = A(1) / l[r];
        for (int64_t d = 0; d < D; ++d) out_r[d * os.d] = store<T>(acc[r * D + d] * inv);
        lse_r = m[r] + std::log(l[r]);
      }
    }
  });
}

template <typename T, typename Gemms>
void bwd(const SinkAttentionBwdParams& p, const CpuContext& ctx) {
  using A = typename AccOf<T>::type;
  constexpr int64_t bq = Gemms::kBlockQ;
  const Setup<T> st(p);
  const typename Gemms::Shared kv(p, Pass::kBackward, ctx);
  const int64_t B = st.B, H = st.H, Hkv = st.Hkv, Lq = st.Lq, Lk = st.Lk, D = st.D;
  const int64_t group = st.group;
  const int64_t bk = st.bk;
  const A scale = st.scale;
  const bool has_sink = p.sink_k != nullptr;
  const auto* sink_logit = st.sink_logit;
  const auto* lse = static_cast<const A*>(p.lse);
  const auto* dlse = static_cast<const A*>(p.dlse);

  // Per query head partial gradients, reduced over each GQA group (and the batch, for a
  // shared sink) in a fixed order afterwards: no atomics, bit-identical run to run.
  std::vector<A> dk_part(static_cast<size_t>(B * H * Lk * D), A(0));
  std::vector<A> dv_part(dk_part.size(), A(0));
  std::vector<A> dsk_part(has_sink ? B * H * D : 0, A(0)), dsv_part(dsk_part.size(), A(0));
  std::vector<A> dlam_part(sink_logit ? B * H : 0, A(0));

  ctx.parallel_for(B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(bq * D), dout(bq * D), out_r(D), dq(bq * D);
    std::vector<A> s(bq * bk), dp(bq * bk), lse_t(bq), delta(bq);
    typename Gemms::Tile t(kv, bk, D, scale);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      t.head(b, hk);
      const bool* key_mask = st.key_mask(b);
      const bool* query_mask = st.query_mask(b);
      const int64_t* segments = st.segments(b);
      A* dkp = dk_part.data() + bh * Lk * D;
      A* dvp = dv_part.data() + bh * Lk * D;
      const A* sk = st.sink_k(b, hk);
      const A* sv = st.sink_v(b, hk);

      for (int64_t i0 = 0; i0 < Lq; i0 += bq) {
        const int64_t nq = std::min(bq, Lq - i0);
        load_tile(static_cast<const T*>(p.q), p.q_stride, b, h, i0, nq, D, scale, qs.data());
        load_tile(static_cast<const T*>(p.dout), p.dout_stride, b, h, i0, nq, D, A(1), dout.data());
        t.set_q(p, b, h, i0, nq, qs.data());
        std::fill(dq.begin(), dq.end(), A(0));
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t i = i0 + r;
          A* dout_r = dout.data() + r * D;
          if (query_mask && !query_mask[i]) {
            // Padded rows output a constant 0: zero dO and an infinite lse make P = 0,
            // so they add nothing below.
            std::fill(dout_r, dout_r + D, A(0));
            lse_t[r] = std::numeric_limits<A>::infinity();
            delta[r] = 0;
            continue;
          }
          load_tile(static_cast<const T*>(p.out), p.out_stride, b, h, i, 1, D, A(1), out_r.data());
          lse_t[r] = lse[bh * Lq + i];
          // delta = rowsum(dO * O) - dlse: dS = P (dP - delta) then also carries d lse / d s = P.
          delta[r] = row::dot(dout_r, out_r.data(), D) - (dlse ? dlse[bh * Lq + i] : A(0));
          const A* qs_r = qs.data() + r * D;
          if (sk) {
            const A p_sink = std::exp(row::dot(qs_r, sk, D) - lse_t[r]);
            const A ds = p_sink * (row::dot(dout_r, sv, D) - delta[r]);
            row::axpy(p_sink, dout_r, dsv_part.data() + bh * D, D);
            row::axpy(ds, qs_r, dsk_part.data() + bh * D, D);
            row::axpy(ds, sk, dq.data() + r * D, D);
          }
          if (sink_logit) dlam_part[bh] -= std::exp(sink_logit[h] - lse_t[r]) * delta[r];
        }
        t.set_dout(dout.data());  // padded rows zeroed above

        const KeyRange keys = visible_keys(segments, i0, nq, Lk);
        for (int64_t j0 = keys.begin; j0 < keys.end; j0 += bk) {
          const int64_t nk = std::min(bk, keys.end - j0);
          t.scores(j0, nk, s.data());
          mask_padded_keys(key_mask, j0, nk, s.data(), nq, bk);
          mask_other_segments(segments, i0, nq, j0, nk, s.data(), bk);
          for (int64_t r = 0; r < nq; ++r) row::exp_sub(s.data() + r * bk, nk, lse_t[r]);
          // s now holds P; dp gets dP, then dS = P (dP - delta).
          t.acc_dv(s.data(), j0, nk, dvp + j0 * D);
          t.dp(j0, nk, dp.data());
          for (int64_t r = 0; r < nq; ++r)
            row::softmax_grad(s.data() + r * bk, dp.data() + r * bk, nk, delta[r]);
          t.acc_dq(dp.data(), j0, nk, dq.data());
          t.acc_dk(dp.data(), j0, nk, dkp + j0 * D);
        }

        T* dq_out = static_cast<T*>(p.dq) + (bh * Lq + i0) * D;
        for (int64_t x = 0; x < nq * D; ++x) dq_out[x] = store<T>(dq[x] * scale);
      }
    }
  });

  // dK, dV: sum the query heads of each group.
  ctx.parallel_for(B * Hkv * Lk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> sum_k(D), sum_v(D);
    for (int64_t row_id = begin; row_id < end; ++row_id) {
      const int64_t b = row_id / (Hkv * Lk), hk = (row_id / Lk) % Hkv, j = row_id % Lk;
      std::fill(sum_k.begin(), sum_k.end(), A(0));
      std::fill(sum_v.begin(), sum_v.end(), A(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t off = ((b * H + h) * Lk + j) * D;
        row::axpy(A(1), dk_part.data() + off, sum_k.data(), D);
        row::axpy(A(1), dv_part.data() + off, sum_v.data(), D);
      }
      T* dk = static_cast<T*>(p.dk) + row_id * D;
      T* dv = static_cast<T*>(p.dv) + row_id * D;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] = store<T>(sum_k[d]);
        dv[d] = store<T>(sum_v[d]);
      }
    }
  });

  // Sink gradients: over the group, and over the batch when the sink is shared.
  if (has_sink) {
    A* dsk = static_cast<A*>(p.dsink_k);
    A* dsv = static_cast<A*>(p.dsink_v);
    const int64_t sink_batches = p.sink_batch_stride == 0 ? 1 : B;
    std::fill(dsk, dsk + sink_batches * Hkv * D, A(0));
    std::fill(dsv, dsv + sink_batches * Hkv * D, A(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t dst = ((sink_batches == 1 ? 0 : b) * Hkv + h / group) * D;
        row::axpy(A(1), dsk_part.data() + (b * H + h) * D, dsk + dst, D);
        row::axpy(A(1), dsv_part.data() + (b * H + h) * D, dsv + dst, D);
      }
  }
  if (sink_logit) {
    A* dlam = static_cast<A*>(p.dsink_logit);
    for (int64_t h = 0; h < H; ++h) {
      dlam[h] = 0;
      for (int64_t b = 0; b < B; ++b) dlam[h] += dlam_part[b * H + h];
    }
  }
}

}  // namespace
}  // namespace sinkdlm::sink_attention
