// The torch-free sink-attention core against a naive double-precision reference that
// materialises every score. Outputs are poisoned with NaN first; every element is checked.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/cpu_context.h"
#include "common/gemm_bf16_cpu.h"
#include "common/half.h"
#include "sink_attention/sink_attention_cpu.h"

namespace sinkdlm {
namespace {

struct Config {
  int64_t B, H, Hkv, L, D;
  bool sink_token, shared_sink, sink_logit, padding, transposed;
  bool segments = false;  // packed rows: documents of the lengths kSegmentLengths cycles through
};

// Document lengths of packed rows (each row starts at a different place in the cycle): lengths 1,
// boundaries off the 32-key panels and the 64/256-row query tiles, documents longer than a tile.
constexpr int64_t kSegmentLengths[] = {1, 37, 5, 300, 2, 513, 64};

std::vector<int64_t> segment_ids(const Config& c) {
  std::vector<int64_t> ids(c.B * c.L);
  for (int64_t b = 0; b < c.B; ++b) {
    int64_t doc = b, left = kSegmentLengths[b % 7];
    for (int64_t i = 0; i < c.L; ++i) {
      if (left == 0) left = kSegmentLengths[++doc % 7];
      ids[b * c.L + i] = doc;
      --left;
    }
  }
  return ids;
}

struct Naive {
  std::vector<double> out, lse, dq, dk, dv, dsk, dsv, dlam;
};

// Layout helper: contiguous (B, H, L, D), or (B, L, H, D) memory seen as (B, H, L, D).
Strides4 layout(const Config& c, int64_t heads) {
  if (c.transposed) return {c.L * heads * c.D, c.D, heads * c.D, 1};
  return {heads * c.L * c.D, c.L * c.D, c.D, 1};
}
int64_t at(const Strides4& s, int64_t b, int64_t h, int64_t i, int64_t d) {
  return b * s.b + h * s.h + i * s.l + d * s.d;
}

Naive naive(const Config& c, const std::vector<double>& q, const std::vector<double>& k,
            const std::vector<double>& v, const std::vector<double>& sk,
            const std::vector<double>& sv, const std::vector<double>& lam,
            const std::vector<char>& mask, const std::vector<int64_t>& seg,
            const std::vector<double>& dout, double scale) {
  const int64_t group = c.H / c.Hkv;
  const Strides4 sq = layout(c, c.H), skv = layout(c, c.Hkv);
  Naive r;
  r.out.assign(c.B * c.H * c.L * c.D, 0);
  r.lse.assign(c.B * c.H * c.L, 0);
  r.dq.assign(r.out.size(), 0);
  r.dk.assign(c.B * c.Hkv * c.L * c.D, 0);
  r.dv.assign(r.dk.size(), 0);
  const int64_t sink_b = c.shared_sink ? 1 : c.B;
  r.dsk.assign(sink_b * c.Hkv * c.D, 0);
  r.dsv.assign(r.dsk.size(), 0);
  r.dlam.assign(c.H, 0);
  const int64_t n = c.L + 2;  // keys, then the sink token, then the logit sink
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t hk = h / group;
      const int64_t soff = ((c.shared_sink ? 0 : b) * c.Hkv + hk) * c.D;
      for (int64_t i = 0; i < c.L; ++i) {
        if (c.padding && !mask[b * c.L + i]) continue;
        const int64_t row = (b * c.H + h) * c.L + i;
        std::vector<double> s(n, -INFINITY);
        for (int64_t j = 0; j < c.L; ++j) {
          if (c.padding && !mask[b * c.L + j]) continue;
          if (c.segments && seg[b * c.L + j] != seg[b * c.L + i]) continue;
          double dot = 0;
          for (int64_t d = 0; d < c.D; ++d) dot += q[at(sq, b, h, i, d)] * k[at(skv, b, hk, j, d)];
          s[j] = dot * scale;
        }
        if (c.sink_token) {
          double dot = 0;
          for (int64_t d = 0; d < c.D; ++d) dot += q[at(sq, b, h, i, d)] * sk[soff + d];
          s[c.L] = dot * scale;
        }
        if (c.sink_logit) s[c.L + 1] = lam[h];
        double mx = -INFINITY;
        for (double x : s) mx = std::max(mx, x);
        double sum = 0;
        for (double x : s) sum += std::exp(x - mx);
        const double lse = mx + std::log(sum);
        r.lse[row] = lse;
        std::vector<double> p(n);
        for (int64_t j = 0; j < n; ++j) p[j] = std::exp(s[j] - lse);
        auto value = [&](int64_t j, int64_t d) {
          if (j < c.L) return v[at(skv, b, hk, j, d)];
          return j == c.L ? sv[soff + d] : 0.0;
        };
        auto key = [&](int64_t j, int64_t d) {
          return j < c.L ? k[at(skv, b, hk, j, d)] : sk[soff + d];
        };
        double delta = 0;
        for (int64_t d = 0; d < c.D; ++d) {
          double o = 0;
          for (int64_t j = 0; j <= c.L; ++j) o += p[j] * value(j, d);
          r.out[row * c.D + d] = o;
          delta += o * dout[row * c.D + d];
        }
        for (int64_t j = 0; j < n; ++j) {
          if (p[j] == 0) continue;
          double dp = 0;
          for (int64_t d = 0; d < c.D; ++d) dp += dout[row * c.D + d] * value(j, d);
          const double ds = p[j] * (dp - delta);
          if (j == c.L + 1) {
            r.dlam[h] += ds;
            continue;
          }
          for (int64_t d = 0; d < c.D; ++d) {
            const double qd = q[at(sq, b, h, i, d)];
            r.dq[row * c.D + d] += ds * key(j, d) * scale;
            const int64_t kv = ((b * c.Hkv + hk) * c.L + j) * c.D + d;
            if (j < c.L) {
              r.dk[kv] += ds * qd * scale;
              r.dv[kv] += p[j] * dout[row * c.D + d];
            } else {
              r.dsk[soff + d] += ds * qd * scale;
              r.dsv[soff + d] += p[j] * dout[row * c.D + d];
            }
          }
        }
      }
    }
  return r;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  std::vector<T> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = store<T>(x[i]);
  return y;
}
template <typename T>
std::vector<double> uncast(const std::vector<T>& x) {
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = load<double>(x[i]);
  return y;
}

// x laid out with strides s, as a contiguous (B, H, L, D).
std::vector<double> contiguous(const std::vector<double>& x, const Config& c, const Strides4& s) {
  std::vector<double> y(c.B * c.H * c.L * c.D);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < c.L; ++i)
        for (int64_t d = 0; d < c.D; ++d)
          y[((b * c.H + h) * c.L + i) * c.D + d] = x[at(s, b, h, i, d)];
  return y;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double tol,
                  const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], tol * (1 + std::abs(want[i]))) << what << " at " << i;
}

// bf16 GEMM kernels for the context: what choose_bf16_kernels picks for this CPU, the
// avx512_bf16 ones (skipped where the CPU lacks them), none (bf16 through sgemm, as on Intel
// CPUs and CPUs without avx512_bf16) or the portable ones.
enum class Bf16Gemm { kAuto, kAvx512, kNone, kPortable };

template <typename T>
void run(const Config& c, ScalarType dtype, double tol, Bf16Gemm bf16_gemm = Bf16Gemm::kAuto) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::mt19937 rng(1234 + c.L * 7 + c.D);
  std::normal_distribution<double> normal;
  auto randn = [&](int64_t n) {
    std::vector<double> x(n);
    for (auto& e : x) e = normal(rng);
    return x;
  };
  const int64_t nq = c.B * c.H * c.L * c.D, nkv = c.B * c.Hkv * c.L * c.D;
  const int64_t sink_b = c.shared_sink ? 1 : c.B;
  // Round the inputs to T first, so the reference sees exactly what the kernel sees.
  auto q = uncast(cast<T>(randn(nq))), k = uncast(cast<T>(randn(nkv)));
  auto v = uncast(cast<T>(randn(nkv))), dout = uncast(cast<T>(randn(nq)));
  const auto sk = randn(sink_b * c.Hkv * c.D), sv = randn(sink_b * c.Hkv * c.D);
  const auto lam = randn(c.H);
  std::vector<char> mask(c.B * c.L, 1);
  if (c.padding)
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t i = 0; i < c.L; ++i) mask[b * c.L + i] = (i + b) % 3 != 0 || c.L == 1;
  std::unique_ptr<bool[]> mask_arr(new bool[mask.size()]);
  for (size_t i = 0; i < mask.size(); ++i) mask_arr[i] = mask[i];
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  const std::vector<int64_t> seg = segment_ids(c);
  const Naive want = naive(c, q, k, v, sk, sv, lam, mask, seg, dout, scale);

  const auto qt = cast<T>(q), kt = cast<T>(k), vt = cast<T>(v), dot = cast<T>(dout);
  const auto ska = cast<A>(sk), sva = cast<A>(sv), lama = cast<A>(lam);
  SinkAttentionParams p;
  p.dtype = dtype;
  p.batch = c.B, p.heads = c.H, p.kv_heads = c.Hkv, p.seq_len = p.kv_seq_len = c.L;
  p.head_dim = c.D;
  p.scale = scale;
  p.q = qt.data(), p.q_stride = layout(c, c.H);
  p.k = kt.data(), p.k_stride = layout(c, c.Hkv);
  p.v = vt.data(), p.v_stride = layout(c, c.Hkv);
  if (c.sink_token) {
    p.sink_k = ska.data(), p.sink_v = sva.data();
    p.sink_batch_stride = c.shared_sink ? 0 : c.Hkv * c.D;
  }
  if (c.sink_logit) p.sink_logit = lama.data();
  if (c.padding) p.key_padding_mask = p.query_padding_mask = mask_arr.get();  // same tokens
  if (c.segments) p.segment_ids = seg.data();

  const A nan = std::numeric_limits<A>::quiet_NaN();
  std::vector<T> out(nq, store<T>(nan)), dq(nq, store<T>(nan)), dk(nkv, store<T>(nan)),
      dv(nkv, store<T>(nan));
  std::vector<A> lse(c.B * c.H * c.L, nan), dsk(ska.size(), nan), dsv(ska.size(), nan),
      dlam(c.H, nan);
  CpuContext ctx = make_cpu_context(serial_for);
  if (bf16_gemm == Bf16Gemm::kAvx512) {
    if (bf16::avx512_kernels() == nullptr) GTEST_SKIP() << "this CPU lacks avx512_bf16";
    ctx.bf16 = bf16::avx512_kernels();
  }
  if (bf16_gemm == Bf16Gemm::kNone) ctx.bf16 = nullptr;
  if (bf16_gemm == Bf16Gemm::kPortable) ctx.bf16 = &bf16::portable_kernels();
  // Transposed configs also write out as (B, L, H, D), which the backward then reads.
  const Strides4 out_stride = layout(c, c.H);
  p.out = out.data(), p.out_stride = out_stride;
  p.lse = lse.data();
  sink_attention_fwd_cpu(p, ctx);
  expect_close(contiguous(uncast(out), c, out_stride), want.out, tol, "out");
  expect_close(uncast(lse), want.lse, tol, "lse");

  SinkAttentionBwdParams g{p};
  g.dout = dot.data(), g.dout_stride = {c.H * c.L * c.D, c.L * c.D, c.D, 1};
  g.dq = dq.data(), g.dk = dk.data(), g.dv = dv.data();
  if (c.sink_token) g.dsink_k = dsk.data(), g.dsink_v = dsv.data();
  if (c.sink_logit) g.dsink_logit = dlam.data();
  sink_attention_bwd_cpu(g, ctx);
  expect_close(uncast(dq), want.dq, tol, "dq");
  expect_close(uncast(dk), want.dk, tol, "dk");
  expect_close(uncast(dv), want.dv, tol, "dv");
  if (c.sink_token) {
    expect_close(uncast(dsk), want.dsk, tol, "dsink_k");
    expect_close(uncast(dsv), want.dsv, tol, "dsink_v");
  }
  if (c.sink_logit) expect_close(uncast(dlam), want.dlam, tol, "dsink_logit");
}

class SinkAttentionCpu : public ::testing::TestWithParam<Config> {};

TEST_P(SinkAttentionCpu, Float64MatchesNaive) {
  run<double>(GetParam(), ScalarType::kFloat64, 1e-10);
}
TEST_P(SinkAttentionCpu, Float32MatchesNaive) {
  run<float>(GetParam(), ScalarType::kFloat32, 2e-4);
}
TEST_P(SinkAttentionCpu, BFloat16MatchesNaive) {
  run<bfloat16>(GetParam(), ScalarType::kBFloat16, 3e-2);
}
TEST_P(SinkAttentionCpu, BFloat16Avx512Bf16GemmMatchesNaive) {
  run<bfloat16>(GetParam(), ScalarType::kBFloat16, 3e-2, Bf16Gemm::kAvx512);
}
TEST_P(SinkAttentionCpu, BFloat16ViaSgemmMatchesNaive) {
  run<bfloat16>(GetParam(), ScalarType::kBFloat16, 3e-2, Bf16Gemm::kNone);
}
TEST_P(SinkAttentionCpu, BFloat16PortableBf16GemmMatchesNaive) {
  run<bfloat16>(GetParam(), ScalarType::kBFloat16, 3e-2, Bf16Gemm::kPortable);
}
TEST_P(SinkAttentionCpu, Float16MatchesNaive) {
  run<float16>(GetParam(), ScalarType::kFloat16, 5e-3);
}

// L = 1, L not a multiple of the 64- and 256-row query tiles, L past the 512-key tile (513: a
// second tile of one key; 1100: three tiles), padded keys in every tile (the mask's period 3 is
// no divisor of 512, so a mask read without the tile offset shows); GQA and MQA; every sink
// form; padding; transposed (B, L, H, D) inputs; an odd head dim.
INSTANTIATE_TEST_SUITE_P(
    Grid, SinkAttentionCpu,
    ::testing::Values(Config{1, 1, 1, 1, 16, true, true, false, false, false},
                      Config{2, 4, 2, 7, 16, true, false, true, true, false},
                      Config{1, 2, 1, 65, 32, false, false, true, false, true},
                      Config{3, 4, 4, 33, 80, true, true, true, true, true},
                      Config{2, 8, 2, 300, 64, true, false, false, true, false},
                      Config{1, 2, 2, 257, 8, false, false, false, true, true},
                      Config{2, 4, 1, 70, 24, true, true, true, false, false},
                      Config{1, 2, 1, 37, 5, true, false, true, true, true},
                      Config{2, 4, 2, 513, 16, true, false, true, true, false},
                      Config{1, 2, 1, 1100, 16, false, false, false, true, true},
                      Config{1, 2, 2, 1100, 8, true, true, true, true, false},
                      // packed rows
                      Config{1, 1, 1, 1, 16, true, true, false, false, false, true},
                      Config{2, 4, 2, 300, 16, true, false, true, true, false, true},
                      Config{2, 4, 1, 70, 24, false, false, false, true, true, true},
                      Config{2, 2, 2, 1100, 8, true, true, true, true, false, true},
                      Config{1, 2, 1, 1100, 16, false, false, false, false, true, true}),
    [](const ::testing::TestParamInfo<Config>& info) {
      const Config& c = info.param;
      std::string name = "B" + std::to_string(c.B) + "_H" + std::to_string(c.H) + "_Hkv" +
                         std::to_string(c.Hkv) + "_L" + std::to_string(c.L) + "_D" +
                         std::to_string(c.D);
      if (c.sink_token) name += c.shared_sink ? "_sharedsink" : "_batchsink";
      if (c.sink_logit) name += "_logit";
      if (c.padding) name += "_pad";
      if (c.transposed) name += "_strided";
      if (c.segments) name += "_packed";
      return name;
    });

// A -inf logit sink (a float16 logit of -7e4 rounds to it) adds nothing: with no sink token the
// result is plain attention, finite, lse included (it was NaN in every row of the head).
TEST(SinkAttentionCpuEdge, MinusInfinityLogitSinkAddsNothing) {
  const int64_t L = 5, D = 4;
  std::vector<float> q(L * D), k(L * D), v(L * D);
  for (int64_t i = 0; i < L * D; ++i) {
    q[i] = std::sin(0.7f * i), k[i] = std::cos(0.3f * i), v[i] = 0.1f * (i % 7) - 0.2f;
  }
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const Strides4 dense{L * D, L * D, D, 1};
  SinkAttentionParams p;
  p.dtype = ScalarType::kFloat32;
  p.batch = 1, p.heads = 1, p.kv_heads = 1, p.seq_len = p.kv_seq_len = L, p.head_dim = D;
  p.scale = 0.5;
  p.q = q.data(), p.q_stride = dense;
  p.k = k.data(), p.k_stride = dense;
  p.v = v.data(), p.v_stride = dense;
  p.out_stride = dense;
  const CpuContext ctx = make_cpu_context(serial_for);
  std::vector<float> plain(L * D), plain_lse(L), out(L * D, NAN), lse(L, NAN);
  p.out = plain.data(), p.lse = plain_lse.data();
  sink_attention_fwd_cpu(p, ctx);
  p.sink_logit = &minus_inf;
  p.out = out.data(), p.lse = lse.data();
  sink_attention_fwd_cpu(p, ctx);
  for (int64_t i = 0; i < L * D; ++i) ASSERT_EQ(out[i], plain[i]) << "out at " << i;
  for (int64_t i = 0; i < L; ++i) ASSERT_EQ(lse[i], plain_lse[i]) << "lse at " << i;
}

TEST(HalfConversion, RoundTripsAndRounds) {
  for (float x : {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 3.14159f}) {
    EXPECT_EQ(to_float(to_float16(x)), static_cast<float>(static_cast<_Float16>(x))) << x;
    EXPECT_EQ(to_float(to_bfloat16(x)),
              to_float(bfloat16{static_cast<uint16_t>(
                  (float_to_bits(x) + 0x7fff + ((float_to_bits(x) >> 16) & 1)) >> 16)}))
        << x;
  }
  EXPECT_TRUE(std::isinf(to_float(to_float16(1e6f))));
  EXPECT_TRUE(std::isnan(to_float(to_bfloat16(std::nanf("")))));
}

TEST(ReferenceGemm, MatchesBlasConventions) {
  // Row-major C = A^T B^T with A (k x m) and B (n x k), leading dimensions wider than rows.
  const int64_t m = 3, n = 2, k = 4, lda = 5, ldb = 6, ldc = 3;
  std::vector<double> a(k * lda), b(n * ldb), c(m * ldc, 1.0);
  for (size_t i = 0; i < a.size(); ++i) a[i] = 0.5 * static_cast<double>(i) - 3;
  for (size_t i = 0; i < b.size(); ++i) b[i] = 1.0 - 0.25 * static_cast<double>(i);
  const std::vector<double> c0 = c;
  reference_gemm<double>(true, true, m, n, k, 2.0, a.data(), lda, b.data(), ldb, 0.5, c.data(),
                         ldc);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p) acc += a[p * lda + i] * b[j * ldb + p];
      EXPECT_DOUBLE_EQ(c[i * ldc + j], 2.0 * acc + 0.5 * c0[i * ldc + j]);
    }
}

TEST(SinkAttentionCpuEdge, FewerQueriesThanKeysAreTheWholeSequencesRows) {
  // Queries [a, a + n) of a sequence over all of its L keys (a block's queries over cached keys)
  // give the rows [a, a + n) of the whole sequence's attention, forward and dq, in float64.
  const int64_t L = 600, D = 16, H = 2, Hkv = 1, a = 530, n = 40;
  std::mt19937 rng(5);
  std::normal_distribution<double> normal;
  std::vector<double> q(H * L * D), k(Hkv * L * D), v(Hkv * L * D), dout(H * L * D);
  for (auto* x : {&q, &k, &v, &dout})
    for (double& e : *x) e = normal(rng);
  std::vector<double> sk(Hkv * D), sv(Hkv * D);
  for (double& e : sk) e = normal(rng);
  for (double& e : sv) e = normal(rng);
  std::unique_ptr<bool[]> keys(new bool[L]);
  for (int64_t j = 0; j < L; ++j) keys[j] = j >= 7;  // left padding
  const CpuContext ctx = make_cpu_context(serial_for);
  const auto run = [&](int64_t first, int64_t rows, std::vector<double>& out,
                       std::vector<double>& lse, std::vector<double>& dq) {
    SinkAttentionBwdParams p;
    p.dtype = ScalarType::kFloat64;
    p.batch = 1, p.heads = H, p.kv_heads = Hkv, p.seq_len = rows, p.kv_seq_len = L, p.head_dim = D;
    p.scale = 0.25;
    p.q = q.data() + first * D, p.q_stride = {H * L * D, L * D, D, 1};
    p.k = k.data(), p.k_stride = {Hkv * L * D, L * D, D, 1};
    p.v = v.data(), p.v_stride = p.k_stride;
    p.sink_k = sk.data(), p.sink_v = sv.data();
    p.key_padding_mask = keys.get();
    out.assign(H * rows * D, NAN), lse.assign(H * rows, NAN), dq.assign(H * rows * D, NAN);
    p.out = out.data(), p.out_stride = {H * rows * D, rows * D, D, 1}, p.lse = lse.data();
    sink_attention_fwd_cpu(p, ctx);
    std::vector<double> dk(Hkv * L * D), dv(Hkv * L * D), dsk(Hkv * D), dsv(Hkv * D);
    p.dout = dout.data() + first * D, p.dout_stride = p.q_stride;
    p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data(), p.dsink_k = dsk.data();
    p.dsink_v = dsv.data();
    sink_attention_bwd_cpu(p, ctx);
  };
  std::vector<double> out, lse, dq, block_out, block_lse, block_dq;
  run(0, L, out, lse, dq);
  run(a, n, block_out, block_lse, block_dq);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_NEAR(block_lse[h * n + i], lse[h * L + a + i], 1e-12);
      for (int64_t d = 0; d < D; ++d) {
        EXPECT_NEAR(block_out[(h * n + i) * D + d], out[(h * L + a + i) * D + d], 1e-12);
        EXPECT_NEAR(block_dq[(h * n + i) * D + d], dq[(h * L + a + i) * D + d], 1e-12);
      }
    }
}

}  // namespace
}  // namespace sinkdlm
