#include "sink_attention/sink_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/gemm_bf16_cpu.h"
#include "common/half.h"
#include "common/row_ops.h"

namespace sinkdlm {
namespace {

// Keys per tile. The query rows per work item (kBlockQ) belong to the GEMM policy below; a
// tile's scores (at most 256 x 512 floats, 512 KiB) stay in L2 while the tile's GEMMs run.
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

// What the forward and the backward share: sizes and the sink of each (batch, kv head) in
// the accumulation type.
template <typename T>
struct Setup {
  using A = typename AccOf<T>::type;
  explicit Setup(const SinkAttentionProblem& p)
      : p(p),
        B(p.batch),
        H(p.heads),
        Hkv(p.kv_heads),
        L(p.seqlen),
        D(p.head_dim),
        group(H / Hkv),
        bk(std::min(kBlockK, L)),
        scale(static_cast<A>(p.scale)),
        sink_logit(static_cast<const A*>(p.sink_logit)) {}

  const A* sink_k(int64_t b, int64_t hk) const { return sink_row(p.sink_k, b, hk); }
  const A* sink_v(int64_t b, int64_t hk) const { return sink_row(p.sink_v, b, hk); }
  const bool* key_mask(int64_t b) const {
    return p.key_padding_mask ? p.key_padding_mask + b * L : nullptr;
  }

  const SinkAttentionProblem& p;
  const int64_t B, H, Hkv, L, D, group, bk;
  const A scale;
  const A* const sink_logit;

 private:
  const A* sink_row(const void* sink, int64_t b, int64_t hk) const {
    return sink ? static_cast<const A*>(sink) + b * p.sink_batch_stride + hk * D : nullptr;
  }
};

// ---- Tile GEMMs ---------------------------------------------------------------------------
// The forward and the backward run their GEMMs through one of two operand policies with one
// interface, so the softmax logic is written once:
//   BlasGemms<T>  operands in the accumulation type, ctx.gemm (sgemm / dgemm): every dtype.
//   Bf16Gemms     bf16 operands, fp32 sums, ctx.bf16's kernels: bf16 inputs on CPUs with
//                 avx512_bf16, ~4x the sgemm rate. Q, dO, K and V are bf16 already, so only P and
//                 dS get rounded to bf16 (as SDPA's bf16 backward does); softmax math stays fp32.
// Shared holds K and V of every (batch, kv head), made once per call; a Tile holds one thread's
// operands of the current query tile (nq rows) and computes, for keys [j0, j0 + nk):
//   scores:  s = scale Q K^T          acc_pv: acc += P V        (forward)
//   acc_dv:  dv += P^T dO             dp:     dp = dO V^T
//   acc_dq:  dq += dS K               acc_dk: dk += scale dS^T Q
// with s, P, dp, dS row-major nq x nk (stride bk), acc and dq nq x D, dv and dk nk x D.
enum class Pass { kForward, kBackward };

template <typename T>
struct BlasGemms {
  using A = typename AccOf<T>::type;
  // BLAS packs the K (or V) tile again on every call: more query rows per call amortise that
  // (64 rows left ~4% of the float32 time in MKL's packing).
  static constexpr int64_t kBlockQ = 256;
  struct Shared {
    Shared(const SinkAttentionProblem& p, Pass, const CpuContext& ctx)
        : K(static_cast<const T*>(p.k), p.k_stride, p.batch, p.kv_heads, p.seqlen, p.head_dim, ctx),
          V(static_cast<const T*>(p.v), p.v_stride, p.batch, p.kv_heads, p.seqlen, p.head_dim, ctx),
          gemm(ctx.gemm<A>()) {}
    const KVRows<T, A> K, V;
    const GemmFn<A> gemm;
  };

  class Tile {
   public:
    Tile(const Shared& sh, int64_t bk, int64_t D, A /*scale: in qs already*/)
        : sh_(sh), gemm_(sh.gemm), bk_(bk), D_(D) {}
    void head(int64_t b, int64_t hk) {
      k_ = sh_.K.rows(b, hk), v_ = sh_.V.rows(b, hk);
      ldk_ = sh_.K.ld(), ldv_ = sh_.V.ld();
    }
    // qs: the tile's queries times scale, nq x D.
    void set_q(const SinkAttentionProblem&, int64_t, int64_t, int64_t, int64_t nq, const A* qs) {
      qs_ = qs, nq_ = nq;
    }
    void set_dout(const A* dout) { dout_ = dout; }
    void scores(int64_t j0, int64_t nk, A* s) const {
      gemm_(false, true, nq_, nk, D_, A(1), qs_, D_, k_ + j0 * ldk_, ldk_, A(0), s, bk_);
    }
    void acc_pv(const A* pr, int64_t j0, int64_t nk, A* acc) const {
      gemm_(false, false, nq_, D_, nk, A(1), pr, bk_, v_ + j0 * ldv_, ldv_, A(1), acc, D_);
    }
    void acc_dv(const A* pr, int64_t, int64_t nk, A* dv) const {
      gemm_(true, false, nk, D_, nq_, A(1), pr, bk_, dout_, D_, A(1), dv, D_);
    }
    void dp(int64_t j0, int64_t nk, A* dp) const {
      gemm_(false, true, nq_, nk, D_, A(1), dout_, D_, v_ + j0 * ldv_, ldv_, A(0), dp, bk_);
    }
    void acc_dq(const A* ds, int64_t j0, int64_t nk, A* dq) const {
      gemm_(false, false, nq_, D_, nk, A(1), ds, bk_, k_ + j0 * ldk_, ldk_, A(1), dq, D_);
    }
    void acc_dk(const A* ds, int64_t, int64_t nk, A* dk) const {
      gemm_(true, false, nk, D_, nq_, A(1), ds, bk_, qs_, D_, A(1), dk, D_);
    }

   private:
    const Shared& sh_;
    const GemmFn<A> gemm_;
    const int64_t bk_, D_;
    const A* k_ = nullptr;
    const A* v_ = nullptr;
    int64_t ldk_ = 0, ldv_ = 0, nq_ = 0;
    const A* qs_ = nullptr;
    const A* dout_ = nullptr;
  };
};

struct Bf16Gemms {
  // K and V are packed once per call, so small query tiles cost nothing extra and keep the
  // tile's bf16 copies of P and dS in L1/L2.
  static constexpr int64_t kBlockQ = 64;
  // K and V packed as bf16 GEMM B operands, per (batch, kv head): "t" is K^T / V^T (k = D,
  // n = L: for S = Q K^T, dP = dO V^T), "n" is K / V (k = L, n = D: for dQ += dS K, O += P V).
  // Only the layouts the pass uses are made.
  struct Shared {
    Shared(const SinkAttentionProblem& p, Pass pass, const CpuContext& ctx)
        : kern(*ctx.bf16),
          pass(pass),
          L(p.seqlen),
          D(p.head_dim),
          Hkv(p.kv_heads),
          t_panel(bf16::panel_size(D)),
          n_panel(bf16::panel_size(L)),
          t_size(bf16::packed_size(D, L)),
          n_size(bf16::packed_size(L, D)) {
      const bool fwd = pass == Pass::kForward;
      const int64_t heads = p.batch * Hkv;
      kt.resize(heads * t_size);
      (fwd ? vn : vt).resize(heads * (fwd ? n_size : t_size));
      if (!fwd) kn.resize(heads * n_size);
      ctx.parallel_for(heads, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / Hkv, hk = bh % Hkv;
          const Strides4 &ks = p.k_stride, &vs = p.v_stride;
          const auto* k = static_cast<const bfloat16*>(p.k) + b * ks.b + hk * ks.h;
          const auto* v = static_cast<const bfloat16*>(p.v) + b * vs.b + hk * vs.h;
          bf16::pack_b(D, L, k, ks.d, ks.l, kt.data() + bh * t_size, t_panel);
          if (fwd) {
            bf16::pack_b(L, D, v, vs.l, vs.d, vn.data() + bh * n_size, n_panel);
          } else {
            bf16::pack_b(D, L, v, vs.d, vs.l, vt.data() + bh * t_size, t_panel);
            bf16::pack_b(L, D, k, ks.l, ks.d, kn.data() + bh * n_size, n_panel);
          }
        }
      });
    }
    const bf16::Kernels& kern;
    const Pass pass;
    const int64_t L, D, Hkv, t_panel, n_panel, t_size, n_size;
    std::vector<bfloat16> kt, vt, kn, vn;
  };

  class Tile {
   public:
    Tile(const Shared& sh, int64_t bk, int64_t D, float scale)
        : sh_(sh),
          kern_(sh.kern),
          bk_(bk),
          D_(D),
          ldt_(bk + 16),
          scale_(scale),
          q_panel_(bf16::panel_size(kBlockQ)),
          q_(kBlockQ * D),
          dout_(kBlockQ * D),
          x_(kBlockQ * bk),
          // Pair rows bk + 16 pairs apart, not bk: for bk a multiple of 32 an odd number of
          // 64-byte lines, so a row block's pairs spread over L1 sets (a few % on the dV GEMM).
          xt_((kBlockQ + 1) / 2 * 2 * ldt_) {
      if (sh.pass == Pass::kBackward) {
        qb_.resize(bf16::packed_size(kBlockQ, D));
        doutb_.resize(qb_.size());
      }
    }
    void head(int64_t b, int64_t hk) {
      const int64_t bh = b * sh_.Hkv + hk;
      kt_ = sh_.kt.data() + bh * sh_.t_size;
      if (sh_.pass == Pass::kForward) {
        vn_ = sh_.vn.data() + bh * sh_.n_size;
      } else {
        vt_ = sh_.vt.data() + bh * sh_.t_size;
        kn_ = sh_.kn.data() + bh * sh_.n_size;
      }
    }
    // The queries as given (bf16, unscaled: scale goes into the GEMMs, no second rounding).
    void set_q(const SinkAttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t nq,
               const float*) {
      nq_ = nq;
      const Strides4& st = p.q_stride;
      const auto* q = static_cast<const bfloat16*>(p.q) + b * st.b + h * st.h + i0 * st.l;
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t d = 0; d < D_; ++d) q_[r * D_ + d] = q[r * st.l + d * st.d];
      if (sh_.pass == Pass::kBackward) bf16::pack_b(nq, D_, q_.data(), D_, 1, qb_.data(), q_panel_);
    }
    void set_dout(const float* dout) {
      kern_.to_rows(nq_, D_, dout, D_, dout_.data(), D_);  // exact: bf16 values or 0
      bf16::pack_b(nq_, D_, dout_.data(), D_, 1, doutb_.data(), q_panel_);
    }
    void scores(int64_t j0, int64_t nk, float* s) const {
      kern_.gemm(nq_, nk, D_, scale_, q_.data(), D_, 2, key_panels(kt_, j0), sh_.t_panel, 0.0f, s,
                 bk_);
    }
    void acc_pv(const float* pr, int64_t j0, int64_t nk, float* acc) {
      kern_.to_rows(nq_, nk, pr, bk_, x_.data(), bk_);
      kern_.gemm(nq_, D_, nk, 1.0f, x_.data(), bk_, 2, key_rows(vn_, j0), sh_.n_panel, 1.0f, acc,
                 D_);
    }
    void acc_dv(const float* pr, int64_t, int64_t nk, float* dv) {
      kern_.to_pairs(nq_, nk, pr, bk_, xt_.data(), ldt_);
      kern_.gemm(nk, D_, nq_, 1.0f, xt_.data(), 2, 2 * ldt_, doutb_.data(), q_panel_, 1.0f, dv, D_);
    }
    void dp(int64_t j0, int64_t nk, float* dp) const {
      kern_.gemm(nq_, nk, D_, 1.0f, dout_.data(), D_, 2, key_panels(vt_, j0), sh_.t_panel, 0.0f, dp,
                 bk_);
    }
    void acc_dq(const float* ds, int64_t j0, int64_t nk, float* dq) {
      kern_.to_rows(nq_, nk, ds, bk_, x_.data(), bk_);
      kern_.gemm(nq_, D_, nk, 1.0f, x_.data(), bk_, 2, key_rows(kn_, j0), sh_.n_panel, 1.0f, dq,
                 D_);
    }
    void acc_dk(const float* ds, int64_t, int64_t nk, float* dk) {
      kern_.to_pairs(nq_, nk, ds, bk_, xt_.data(), ldt_);
      kern_.gemm(nk, D_, nq_, scale_, xt_.data(), 2, 2 * ldt_, qb_.data(), q_panel_, 1.0f, dk, D_);
    }

   private:
    // Keys from j0 on in a "t" layout (j0 is a multiple of bk, so of the panel width) and in an
    // "n" layout (j0 even; an odd tile ends at L, whose pad row is zero).
    const bfloat16* key_panels(const bfloat16* t, int64_t j0) const {
      return t + j0 / bf16::kPanel * sh_.t_panel;
    }
    static const bfloat16* key_rows(const bfloat16* n, int64_t j0) { return n + j0 * bf16::kPanel; }

    const Shared& sh_;
    const bf16::Kernels& kern_;
    const int64_t bk_, D_, ldt_;
    const float scale_;
    const int64_t q_panel_;
    const bfloat16 *kt_ = nullptr, *vt_ = nullptr, *kn_ = nullptr, *vn_ = nullptr;
    int64_t nq_ = 0;
    // Q and dO row-major (A operands) and packed (B operands); P or dS row-major and as pairs.
    std::vector<bfloat16> q_, qb_, dout_, doutb_, x_, xt_;
  };
};
static_assert(kBlockK % bf16::kPanel == 0, "key tiles start on panel edges");

template <typename T, typename Gemms>
void fwd(const SinkAttentionProblem& p, void* out_ptr, void* lse_ptr, const CpuContext& ctx) {
  using A = typename AccOf<T>::type;
  constexpr int64_t bq = Gemms::kBlockQ;
  const Setup<T> st(p);
  const typename Gemms::Shared kv(p, Pass::kForward, ctx);
  const int64_t B = st.B, H = st.H, L = st.L, D = st.D, bk = st.bk;
  const A scale = st.scale;
  const auto* sink_logit = st.sink_logit;
  T* out = static_cast<T*>(out_ptr);
  A* lse = static_cast<A*>(lse_ptr);
  const int64_t q_tiles = (L + bq - 1) / bq;

  ctx.parallel_for(B * H * q_tiles, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(bq * D), s(bq * bk), acc(bq * D), m(bq), l(bq);
    typename Gemms::Tile t(kv, bk, D, scale);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * q_tiles), h = (item / q_tiles) % H, hk = h / st.group;
      const int64_t i0 = (item % q_tiles) * bq, nq = std::min(bq, L - i0);
      const bool* key_mask = st.key_mask(b);
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

      for (int64_t j0 = 0; j0 < L; j0 += bk) {
        const int64_t nk = std::min(bk, L - j0);
        t.scores(j0, nk, s.data());
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
        t.acc_pv(s.data(), j0, nk, acc.data());
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

template <typename T, typename Gemms>
void bwd(const SinkAttentionProblem& p, const SinkAttentionGrads& g, const CpuContext& ctx) {
  using A = typename AccOf<T>::type;
  constexpr int64_t bq = Gemms::kBlockQ;
  const Setup<T> st(p);
  const typename Gemms::Shared kv(p, Pass::kBackward, ctx);
  const int64_t B = st.B, H = st.H, Hkv = st.Hkv, L = st.L, D = st.D, group = st.group;
  const int64_t bk = st.bk;
  const A scale = st.scale;
  const bool has_sink = p.sink_k != nullptr;
  const auto* sink_logit = st.sink_logit;
  const auto* lse = static_cast<const A*>(g.lse);
  const auto* dlse = static_cast<const A*>(g.dlse);

  // Per query head partial gradients, reduced over each GQA group (and the batch, for a
  // shared sink) in a fixed order afterwards: no atomics, bit-identical run to run.
  std::vector<A> dk_part(static_cast<size_t>(B * H * L * D), A(0));
  std::vector<A> dv_part(dk_part.size(), A(0));
  std::vector<A> dsk_part(has_sink ? B * H * D : 0, A(0)), dsv_part(dsk_part.size(), A(0));
  std::vector<A> dlam_part(sink_logit ? B * H : 0, A(0));

  ctx.parallel_for(B * H, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(bq * D), dout(bq * D), out_r(D), dq(bq * D);
    std::vector<A> s(bq * bk), dp(bq * bk), lse_t(bq), delta(bq);
    typename Gemms::Tile t(kv, bk, D, scale);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      t.head(b, hk);
      const bool* key_mask = st.key_mask(b);
      A* dkp = dk_part.data() + bh * L * D;
      A* dvp = dv_part.data() + bh * L * D;
      const A* sk = st.sink_k(b, hk);
      const A* sv = st.sink_v(b, hk);

      for (int64_t i0 = 0; i0 < L; i0 += bq) {
        const int64_t nq = std::min(bq, L - i0);
        load_tile(static_cast<const T*>(p.q), p.q_stride, b, h, i0, nq, D, scale, qs.data());
        load_tile(static_cast<const T*>(g.dout), g.dout_stride, b, h, i0, nq, D, A(1), dout.data());
        t.set_q(p, b, h, i0, nq, qs.data());
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
        t.set_dout(dout.data());  // padded rows zeroed above

        for (int64_t j0 = 0; j0 < L; j0 += bk) {
          const int64_t nk = std::min(bk, L - j0);
          t.scores(j0, nk, s.data());
          mask_padded_keys(key_mask, j0, nk, s.data(), nq, bk);
          for (int64_t r = 0; r < nq; ++r) row::exp_sub(s.data() + r * bk, nk, lse_t[r]);
          // s now holds P; dp gets dP, then dS = P (dP - delta).
          t.acc_dv(s.data(), j0, nk, dvp + j0 * D);
          t.dp(j0, nk, dp.data());
          for (int64_t r = 0; r < nq; ++r)
            row::softmax_grad(s.data() + r * bk, dp.data() + r * bk, nk, delta[r]);
          t.acc_dq(dp.data(), j0, nk, dq.data());
          t.acc_dk(dp.data(), j0, nk, dkp + j0 * D);
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
  if (has_sink) {
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

// bf16 inputs take the bf16 GEMMs where the context has them (the CPU supports avx512_bf16);
// everything else, and bf16 elsewhere, the BLAS of the accumulation type.
template <typename T>
constexpr bool kBf16 = std::is_same_v<T, bfloat16>;

template <typename T>
struct Fwd {
  static void run(const SinkAttentionProblem& p, void* out, void* lse, const CpuContext& ctx) {
    if constexpr (kBf16<T>)
      if (ctx.bf16) return fwd<T, Bf16Gemms>(p, out, lse, ctx);
    fwd<T, BlasGemms<T>>(p, out, lse, ctx);
  }
};
template <typename T>
struct Bwd {
  static void run(const SinkAttentionProblem& p, const SinkAttentionGrads& g,
                  const CpuContext& ctx) {
    if constexpr (kBf16<T>)
      if (ctx.bf16) return bwd<T, Bf16Gemms>(p, g, ctx);
    bwd<T, BlasGemms<T>>(p, g, ctx);
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
