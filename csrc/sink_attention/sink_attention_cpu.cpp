#include "sink_attention/sink_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/half.h"
#include "common/row_ops.h"

namespace sinkdlm {
namespace {

// Query rows per work item and keys per tile. A tile's scores (kBlockQ x kBlockK floats,
// 128 KiB) and its K/V rows stay in L2 while both GEMMs of the tile run.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 512;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

// K or V rows of every (b, kv head) in the accumulation type, as the GEMMs want them:
// the input itself when it already is (unit last stride, rows at least D apart), else a
// packed copy made once per call (for 16-bit inputs, and odd strides).
template <typename T, typename A>
class KVRows {
 public:
  KVRows(const T* src, const Strides4& st, int64_t B, int64_t Hkv, int64_t L, int64_t D,
         const CpuContext& ctx)
      : src_(src), st_(st), Hkv_(Hkv), L_(L), D_(D) {
    direct_ = std::is_same_v<T, A> && st.d == 1 && st.l >= D && L > 1;
    if (direct_) return;
    packed_.resize(static_cast<size_t>(B * Hkv * L * D));
    ctx.parallel_for(B * Hkv, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const T* base = src + (bh / Hkv) * st.b + (bh % Hkv) * st.h;
        A* dst = packed_.data() + bh * L * D;
        for (int64_t j = 0; j < L; ++j)
          for (int64_t d = 0; d < D; ++d) dst[j * D + d] = load<A>(base[j * st.l + d * st.d]);
      }
    });
  }
  // Row j of head (b, hk) is at rows(b, hk) + j * ld().
  const A* rows(int64_t b, int64_t hk) const {
    if (direct_) return reinterpret_cast<const A*>(src_ + b * st_.b + hk * st_.h);
    return packed_.data() + (b * Hkv_ + hk) * L_ * D_;
  }
  int64_t ld() const { return direct_ ? st_.l : D_; }

 private:
  const T* src_;
  Strides4 st_;
  int64_t Hkv_, L_, D_;
  bool direct_ = false;
  std::vector<A> packed_;
};

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

template <typename T>
void fwd(const SinkAttentionProblem& p, void* out_ptr, void* lse_ptr, const CpuContext& ctx) {
  using A = typename AccOf<T>::type;
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, L = p.seqlen, D = p.head_dim;
  const int64_t group = H / Hkv;
  const A scale = static_cast<A>(p.scale);
  const KVRows<T, A> K(static_cast<const T*>(p.k), p.k_stride, B, Hkv, L, D, ctx);
  const KVRows<T, A> V(static_cast<const T*>(p.v), p.v_stride, B, Hkv, L, D, ctx);
  const auto* sink_k = static_cast<const A*>(p.sink_k);
  const auto* sink_v = static_cast<const A*>(p.sink_v);
  const auto* sink_logit = static_cast<const A*>(p.sink_logit);
  T* out = static_cast<T*>(out_ptr);
  A* lse = static_cast<A*>(lse_ptr);
  const GemmFn<A> gemm = ctx.gemm<A>();
  const int64_t q_tiles = (L + kBlockQ - 1) / kBlockQ;
  const int64_t bk = std::min(kBlockK, L);

  ctx.parallel_for(B * H * q_tiles, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(kBlockQ * D), s(kBlockQ * bk), acc(kBlockQ * D), m(kBlockQ), l(kBlockQ);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * q_tiles), h = (item / q_tiles) % H, hk = h / group;
      const int64_t i0 = (item % q_tiles) * kBlockQ, nq = std::min(kBlockQ, L - i0);
      const A* k = K.rows(b, hk);
      const A* v = V.rows(b, hk);
      const int64_t ldk = K.ld(), ldv = V.ld();
      const bool* key_mask = p.key_padding_mask ? p.key_padding_mask + b * L : nullptr;
      load_tile(static_cast<const T*>(p.q), p.q_stride, b, h, i0, nq, D, scale, qs.data());

      // The sink opens every row's online softmax: running max, sum and accumulator.
      const A* sk = sink_k ? sink_k + b * p.sink_batch_stride + hk * D : nullptr;
      const A* sv = sink_v ? sink_v + b * p.sink_batch_stride + hk * D : nullptr;
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
        if (sink_logit) {
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

      for (int64_t j0 = 0; j0 < L; j0 += bk) {
        const int64_t nk = std::min(bk, L - j0);
        gemm(false, true, nq, nk, D, A(1), qs.data(), D, k + j0 * ldk, ldk, A(0), s.data(), bk);
        mask_padded_keys(key_mask, j0, nk, s.data(), nq, bk);
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
        gemm(false, false, nq, D, nk, A(1), s.data(), bk, v + j0 * ldv, ldv, A(1), acc.data(), D);
      }

      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        T* out_r = out + ((b * H + h) * L + i) * D;
        A& lse_r = lse[(b * H + h) * L + i];
        const bool padded = key_mask && !key_mask[i];
        if (padded || l[r] == A(0)) {
          std::fill(out_r, out_r + D, store<T>(A(0)));
          lse_r = 0;
          continue;
        }
        const A inv = A(1) / l[r];
        for (int64_t d = 0; d < D; ++d) out_r[d] = store<T>(acc[r * D + d] * inv);
        lse_r = m[r] + std::log(l[r]);
      }
    }
  });
}

template <typename T>
void bwd(const SinkAttentionProblem& p, const SinkAttentionGrads& g, const CpuContext& ctx) {
  using A = typename AccOf<T>::type;
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, L = p.seqlen, D = p.head_dim;
  const int64_t group = H / Hkv;
  const A scale = static_cast<A>(p.scale);
  const KVRows<T, A> K(static_cast<const T*>(p.k), p.k_stride, B, Hkv, L, D, ctx);
  const KVRows<T, A> V(static_cast<const T*>(p.v), p.v_stride, B, Hkv, L, D, ctx);
  const auto* sink_k = static_cast<const A*>(p.sink_k);
  const auto* sink_v = static_cast<const A*>(p.sink_v);
  const auto* sink_logit = static_cast<const A*>(p.sink_logit);
  const auto* lse = static_cast<const A*>(g.lse);
  const auto* dlse = static_cast<const A*>(g.dlse);
  const GemmFn<A> gemm = ctx.gemm<A>();
  const int64_t q_tiles = (L + kBlockQ - 1) / kBlockQ;
  const int64_t bk = std::min(kBlockK, L);

  // Per query head partial gradients, reduced over each GQA group (and the batch, for a
  // shared sink) in a fixed order afterwards: no atomics, bit-identical run to run.
  std::vector<A> dk_part(static_cast<size_t>(B * H * L * D), A(0));
  std::vector<A> dv_part(dk_part.size(), A(0));
  std::vector<A> dsk_part(sink_k ? B * H * D : 0, A(0)), dsv_part(dsk_part.size(), A(0));
  std::vector<A> dlam_part(sink_logit ? B * H : 0, A(0));

  ctx.parallel_for(B * H, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(kBlockQ * D), dout(kBlockQ * D), out_r(D), dq(kBlockQ * D);
    std::vector<A> s(kBlockQ * bk), dp(kBlockQ * bk), lse_t(kBlockQ), delta(kBlockQ);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      const A* k = K.rows(b, hk);
      const A* v = V.rows(b, hk);
      const int64_t ldk = K.ld(), ldv = V.ld();
      const bool* key_mask = p.key_padding_mask ? p.key_padding_mask + b * L : nullptr;
      A* dkp = dk_part.data() + bh * L * D;
      A* dvp = dv_part.data() + bh * L * D;
      const A* sk = sink_k ? sink_k + b * p.sink_batch_stride + hk * D : nullptr;
      const A* sv = sink_v ? sink_v + b * p.sink_batch_stride + hk * D : nullptr;

      for (int64_t i0 = 0; i0 < L; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, L - i0);
        load_tile(static_cast<const T*>(p.q), p.q_stride, b, h, i0, nq, D, scale, qs.data());
        load_tile(static_cast<const T*>(g.dout), g.dout_stride, b, h, i0, nq, D, A(1), dout.data());
        std::fill(dq.begin(), dq.end(), A(0));
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t i = i0 + r;
          A* dout_r = dout.data() + r * D;
          if (key_mask && !key_mask[i]) {
            // Padded rows output a constant 0: zero dO and an infinite lse make P = 0,
            // so they add nothing below.
            std::fill(dout_r, dout_r + D, A(0));
            lse_t[r] = std::numeric_limits<A>::infinity();
            delta[r] = 0;
            continue;
          }
          load_tile(static_cast<const T*>(g.out), g.out_stride, b, h, i, 1, D, A(1), out_r.data());
          lse_t[r] = lse[bh * L + i];
          // delta = rowsum(dO * O) - dlse: dS = P (dP - delta) then also carries d lse / d s = P.
          delta[r] = row::dot(dout_r, out_r.data(), D) - (dlse ? dlse[bh * L + i] : A(0));
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

        for (int64_t j0 = 0; j0 < L; j0 += bk) {
          const int64_t nk = std::min(bk, L - j0);
          gemm(false, true, nq, nk, D, A(1), qs.data(), D, k + j0 * ldk, ldk, A(0), s.data(), bk);
          mask_padded_keys(key_mask, j0, nk, s.data(), nq, bk);
          for (int64_t r = 0; r < nq; ++r) row::exp_sub(s.data() + r * bk, nk, lse_t[r]);
          // s now holds P. dV += P^T dO; dP = dO V^T; dS = P (dP - delta); dQ += dS K; dK += dS^T
          // Qs.
          gemm(true, false, nk, D, nq, A(1), s.data(), bk, dout.data(), D, A(1), dvp + j0 * D, D);
          gemm(false, true, nq, nk, D, A(1), dout.data(), D, v + j0 * ldv, ldv, A(0), dp.data(),
               bk);
          for (int64_t r = 0; r < nq; ++r)
            row::softmax_grad(s.data() + r * bk, dp.data() + r * bk, nk, delta[r]);
          gemm(false, false, nq, D, nk, A(1), dp.data(), bk, k + j0 * ldk, ldk, A(1), dq.data(), D);
          gemm(true, false, nk, D, nq, A(1), dp.data(), bk, qs.data(), D, A(1), dkp + j0 * D, D);
        }

        T* dq_out = static_cast<T*>(g.dq) + (bh * L + i0) * D;
        for (int64_t x = 0; x < nq * D; ++x) dq_out[x] = store<T>(dq[x] * scale);
      }
    }
  });

  // dK, dV: sum the query heads of each group.
  ctx.parallel_for(B * Hkv * L, [&](int64_t begin, int64_t end) {
    std::vector<A> sum_k(D), sum_v(D);
    for (int64_t row_id = begin; row_id < end; ++row_id) {
      const int64_t b = row_id / (Hkv * L), hk = (row_id / L) % Hkv, j = row_id % L;
      std::fill(sum_k.begin(), sum_k.end(), A(0));
      std::fill(sum_v.begin(), sum_v.end(), A(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t off = ((b * H + h) * L + j) * D;
        row::axpy(A(1), dk_part.data() + off, sum_k.data(), D);
        row::axpy(A(1), dv_part.data() + off, sum_v.data(), D);
      }
      T* dk = static_cast<T*>(g.dk) + row_id * D;
      T* dv = static_cast<T*>(g.dv) + row_id * D;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] = store<T>(sum_k[d]);
        dv[d] = store<T>(sum_v[d]);
      }
    }
  });

  // Sink gradients: over the group, and over the batch when the sink is shared.
  if (sink_k) {
    A* dsk = static_cast<A*>(g.dsink_k);
    A* dsv = static_cast<A*>(g.dsink_v);
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
    A* dlam = static_cast<A*>(g.dsink_logit);
    for (int64_t h = 0; h < H; ++h) {
      dlam[h] = 0;
      for (int64_t b = 0; b < B; ++b) dlam[h] += dlam_part[b * H + h];
    }
  }
}

template <template <typename> class Fn, typename... Args>
void dispatch(ScalarType t, Args&&... args) {
  switch (t) {
    case ScalarType::kFloat32:
      return Fn<float>::run(args...);
    case ScalarType::kFloat64:
      return Fn<double>::run(args...);
    case ScalarType::kFloat16:
      return Fn<float16>::run(args...);
    case ScalarType::kBFloat16:
      return Fn<bfloat16>::run(args...);
  }
}

template <typename T>
struct Fwd {
  static void run(const SinkAttentionProblem& p, void* out, void* lse, const CpuContext& ctx) {
    fwd<T>(p, out, lse, ctx);
  }
};
template <typename T>
struct Bwd {
  static void run(const SinkAttentionProblem& p, const SinkAttentionGrads& g,
                  const CpuContext& ctx) {
    bwd<T>(p, g, ctx);
  }
};

}  // namespace

void sink_attention_fwd_cpu(const SinkAttentionProblem& p, void* out, void* lse,
                            const CpuContext& ctx) {
  dispatch<Fwd>(p.dtype, p, out, lse, ctx);
}

void sink_attention_bwd_cpu(const SinkAttentionProblem& p, const SinkAttentionGrads& g,
                            const CpuContext& ctx) {
  dispatch<Bwd>(p.dtype, p, g, ctx);
}

}  // namespace sinkdlm
