// The tile GEMM policies of the CPU sink attention (the "traits" of the kernel in
// sink_attention_kernel_cpu.h): tile sizes, where K and V live, and the GEMMs a tile runs.
// Included by sink_attention_cpu.cpp only.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/cpu_context.h"
#include "common/gemm_bf16_cpu.h"
#include "common/half.h"
#include "sink_attention/sink_attention_params.h"

// Unnamed namespace: internal linkage, as if this were written in the one .cpp that includes it,
// so no instantiation is exported from _C.
namespace sinkdlm::sink_attention {
namespace {

// Keys per tile. The query rows per work item (kBlockQ) belong to the GEMM policy below; a
// tile's scores (at most 256 x 512 floats, 512 KiB) stay in L2 while the tile's GEMMs run.
inline constexpr int64_t kBlockK = 512;

// The accumulation type: double for float64, float for every other dtype.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

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
    ctx.parallel_for(B * Hkv, 1, [&](int64_t begin, int64_t end) {
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

// The forward and the backward run their GEMMs through one of two operand policies with one
// interface, so the softmax logic is written once:
//   BlasGemms<T>  operands in the accumulation type, ctx.gemm (sgemm / dgemm): every dtype.
//   Bf16Gemms     bf16 operands, fp32 sums, ctx.bf16's kernels: bf16 inputs where
//                 choose_bf16_kernels (cpu_context.h) picks them: AMD with avx512_bf16, ~4x the
//                 sgemm rate there (Intel's vdpbf16ps is slower than its sgemm, so bf16 takes
//                 BlasGemms<bfloat16> there). Q, dO, K and V are bf16 already, so only P and
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
    Shared(const SinkAttentionParams& p, Pass, const CpuContext& ctx)
        : K(static_cast<const T*>(p.k), p.k_stride, p.batch, p.kv_heads, p.kv_seq_len, p.head_dim,
            ctx),
          V(static_cast<const T*>(p.v), p.v_stride, p.batch, p.kv_heads, p.kv_seq_len, p.head_dim,
            ctx),
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
    void set_q(const SinkAttentionParams&, int64_t, int64_t, int64_t, int64_t nq, const A* qs) {
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
    Shared(const SinkAttentionParams& p, Pass pass, const CpuContext& ctx)
        : kern(*ctx.bf16),
          pass(pass),
          L(p.kv_seq_len),
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
      ctx.parallel_for(heads, 1, [&](int64_t begin, int64_t end) {
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
    void set_q(const SinkAttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq,
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

}  // namespace
}  // namespace sinkdlm::sink_attention
