// GoogleTest for the torch-free attention-mass kernel against a naive dense reference that builds
// the full softmax matrix in double precision.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "analysis/attention_mass_cpu.h"
#include "common/half.h"

namespace {

// Two calls over disjoint (batch, head) ranges, as a threaded host makes.
const sinkdlm::CpuContext kTwoChunks = sinkdlm::make_cpu_context(
    [](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
      fn(0, n / 2);
      fn(n / 2, n);
    });

struct Case {
  int64_t B, H, Hkv, L, D;
  bool sink_k, sink_logit, padding;
};

// Dense reference: scores over [sink_k?, sink_logit?, keys], softmax, column means over real rows.
void reference(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
               const std::vector<double>& sk, const std::vector<double>& sl,
               const std::vector<char>& mask, double scale, std::vector<double>& mass,
               std::vector<double>& sink_mass, std::vector<double>& lse) {
  const int64_t L = c.L, D = c.D, G = c.H / c.Hkv;
  mass.assign(c.B * c.H * L, 0.0);
  sink_mass.assign(c.B * c.H, 0.0);
  lse.assign(c.B * c.H * L, 0.0);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t hk = h / G;
      int64_t n_real = 0;
      for (int64_t i = 0; i < L; ++i) n_real += mask[b * L + i];
      for (int64_t i = 0; i < L; ++i) {
        if (!mask[b * L + i]) continue;
        std::vector<double> s;  // keys, then the sinks
        for (int64_t j = 0; j < L; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += q[((b * c.H + h) * L + i) * D + d] * k[((b * c.Hkv + hk) * L + j) * D + d];
          s.push_back(mask[b * L + j] ? dot * scale : -INFINITY);
        }
        if (c.sink_k) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += q[((b * c.H + h) * L + i) * D + d] * sk[hk * D + d];
          s.push_back(dot * scale);
        }
        if (c.sink_logit) s.push_back(sl[h]);
        double mx = -INFINITY, sum = 0;
        for (double x : s) mx = std::max(mx, x);
        for (double x : s) sum += std::exp(x - mx);
        const double l = mx + std::log(sum);
        lse[(b * c.H + h) * L + i] = l;
        for (int64_t j = 0; j < L; ++j) mass[(b * c.H + h) * L + j] += std::exp(s[j] - l) / n_real;
        for (size_t j = L; j < s.size(); ++j) sink_mass[b * c.H + h] += std::exp(s[j] - l) / n_real;
      }
    }
}

// A bfloat16 GEMM for the tests (no BLAS here): the inputs widened, then the reference GEMM.
void reference_bf16_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                         const sinkdlm::bfloat16* a, int64_t lda, const sinkdlm::bfloat16* b,
                         int64_t ldb, float beta, float* c, int64_t ldc) {
  const auto widen = [](const sinkdlm::bfloat16* x, int64_t count) {
    std::vector<float> out(count);
    for (int64_t i = 0; i < count; ++i) out[i] = sinkdlm::to_float(x[i]);
    return out;
  };
  const std::vector<float> af = widen(a, (ta ? k : m) * lda), bf = widen(b, (tb ? n : k) * ldb);
  sinkdlm::reference_gemm<float>(ta, tb, m, n, k, alpha, af.data(), lda, bf.data(), ldb, beta, c,
                                 ldc);
}

// bf16_qk: q and k stored as bfloat16 (the reference sees the same rounded values).
template <typename T>
void run_case(const Case& c, double tol, bool bf16_qk = false,
              const sinkdlm::CpuContext& ctx = kTwoChunks) {
  std::mt19937 rng(1234 + c.L * 7 + c.D);
  std::normal_distribution<double> n01(0.0, 1.0);
  auto randn = [&](size_t n) {
    std::vector<double> v(n);
    for (auto& x : v) x = n01(rng);
    return v;
  };
  const int64_t L = c.L, D = c.D;
  std::vector<double> q = randn(c.B * c.H * L * D), k = randn(c.B * c.Hkv * L * D);
  std::vector<double> sk = randn(c.Hkv * D), sl = randn(c.H);
  std::vector<char> mask(c.B * L, 1);
  if (c.padding)
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t i = L - b; i < L; ++i) mask[b * L + i] = 0;  // batch b has b padded tail tokens
  if (bf16_qk)
    for (std::vector<double>* v : {&q, &k})
      for (double& x : *v) x = sinkdlm::to_float(sinkdlm::to_bfloat16(static_cast<float>(x)));
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> want, want_sink, lse;
  reference(c, q, k, sk, sl, mask, scale, want, want_sink, lse);

  auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  std::vector<T> qt = cast(q), kt = cast(k), skt = cast(sk), slt = cast(sl), lset = cast(lse);
  std::unique_ptr<bool[]> mask_b(new bool[mask.size()]);
  for (size_t i = 0; i < mask.size(); ++i) mask_b[i] = mask[i] != 0;
  std::vector<T> mass(c.B * c.H * L, T(-7)), sink_mass(c.B * c.H, T(-7));  // poisoned

  sinkdlm::AttentionMassParams p;
  p.dtype =
      std::is_same_v<T, double> ? sinkdlm::ScalarType::kFloat64 : sinkdlm::ScalarType::kFloat32;
  p.batch = c.B, p.heads = c.H, p.kv_heads = c.Hkv, p.seq_len = L, p.head_dim = D;
  p.scale = scale;
  std::vector<sinkdlm::bfloat16> q16(q.size()), k16(k.size());
  for (size_t i = 0; i < q.size(); ++i) q16[i] = sinkdlm::to_bfloat16(static_cast<float>(q[i]));
  for (size_t i = 0; i < k.size(); ++i) k16[i] = sinkdlm::to_bfloat16(static_cast<float>(k[i]));
  p.qk_bfloat16 = bf16_qk;
  p.q = bf16_qk ? static_cast<const void*>(q16.data()) : qt.data();
  p.q_stride = {c.H * L * D, L * D, D, 1};
  p.k = bf16_qk ? static_cast<const void*>(k16.data()) : kt.data();
  p.k_stride = {c.Hkv * L * D, L * D, D, 1};
  p.lse = lset.data();
  if (c.sink_k) p.sink_k = skt.data(), p.sink_batch_stride = 0;  // one sink for the batch
  if (c.sink_logit) p.sink_logit = slt.data();
  if (c.padding) p.key_padding_mask = mask_b.get();
  p.mass = mass.data();
  p.sink_mass = sink_mass.data();
  ASSERT_TRUE(sinkdlm::attention_mass_cpu(p, ctx));
  for (size_t i = 0; i < mass.size(); ++i) EXPECT_NEAR(mass[i], want[i], tol) << "key " << i;
  for (size_t i = 0; i < sink_mass.size(); ++i)
    EXPECT_NEAR(sink_mass[i], want_sink[i], tol) << "sink " << i;
}

TEST(AttentionMassCpu, MatchesDenseFloat64) {
  for (const Case& c :
       {Case{2, 4, 2, 70, 16, true, false, true}, Case{1, 3, 3, 1, 8, false, false, false},
        Case{3, 2, 1, 65, 5, true, true, true}, Case{2, 2, 2, 9, 4, false, true, false},
        Case{1, 2, 2, 530, 8, true, false, true}})
    run_case<double>(c, 1e-12);
}

TEST(AttentionMassCpu, MatchesDenseFloat32) {
  run_case<float>(Case{2, 4, 2, 130, 32, true, true, true}, 2e-5);
  run_case<float>(Case{1, 2, 1, 1100, 24, true, false, true}, 2e-5);  // several key blocks
}

// bfloat16 q and k: through a bfloat16 GEMM where the context has one, else widened for sgemm.
TEST(AttentionMassCpu, MatchesDenseBfloat16Inputs) {
  sinkdlm::CpuContext with_bf16_gemm = kTwoChunks;
  with_bf16_gemm.bf16_gemm = &reference_bf16_gemm;
  sinkdlm::CpuContext without = kTwoChunks;
  without.bf16_gemm = nullptr;
  for (const sinkdlm::CpuContext* ctx : {&with_bf16_gemm, &without}) {
    run_case<float>(Case{2, 4, 2, 130, 32, true, true, true}, 2e-5, true, *ctx);
    run_case<float>(Case{1, 2, 1, 600, 16, true, false, false}, 2e-5, true, *ctx);
  }
}

TEST(AttentionMassCpu, RejectsInconsistentHeads) {
  sinkdlm::AttentionMassParams p;
  float x = 0;
  p.q = p.k = p.lse = &x;
  p.mass = p.sink_mass = &x;
  p.batch = 1, p.heads = 3, p.kv_heads = 2, p.seq_len = 1, p.head_dim = 1;
  EXPECT_FALSE(sinkdlm::attention_mass_cpu(p, kTwoChunks));
}

}  // namespace
