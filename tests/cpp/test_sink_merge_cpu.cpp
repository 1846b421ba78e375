// GoogleTest for the torch-free sink merge (sink_merge_cpu.h). Forward: the merge of a dense
// attention over the real keys must equal a dense attention over [sink ; keys] (float64).
// Backward: with the token attention held fixed, the merge is a function of q (through the sink
// score) and of the sinks, so its backward must equal central differences of its own forward.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "common/half.h"
#include "sink_attention/sink_merge_cpu.h"

namespace {

using sinkdlm::CpuContext;

struct Case {
  int64_t B, H, Hkv, L, D;
  bool token, per_batch, logit, padding;
};

struct Inputs {
  std::vector<double> q, k, v, sk, sv, lam, attn_out, attn_lse;
  std::unique_ptr<bool[]> mask;
};

CpuContext serial_context() {
  CpuContext ctx;
  ctx.parallel_for = sinkdlm::serial_for;
  return ctx;
}

// Calls fn on single items, last first, whatever the grain: another split than serial_for, for the
// determinism test.
CpuContext reversed_context() {
  CpuContext ctx;
  ctx.parallel_for = [](int64_t n, int64_t /*grain*/,
                        const std::function<void(int64_t, int64_t)>& fn) {
    for (int64_t i = n - 1; i >= 0; --i) fn(i, i + 1);
  };
  return ctx;
}

int64_t sink_rows(const Case& c) { return (c.per_batch ? c.B : 1) * c.Hkv; }

// Dense softmax attention of q over `keys` real keys plus optional extra scores (sink token with
// value, logit without), in double. Writes out (B, H, L, D) and lse (B, H, L).
void dense(const Case& c, const Inputs& in, bool with_sink, std::vector<double>& out,
           std::vector<double>& lse) {
  const int64_t L = c.L, D = c.D, G = c.H / c.Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  out.assign(c.B * c.H * L * D, 0.0);
  lse.assign(c.B * c.H * L, 0.0);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < L; ++i) {
        const int64_t hk = h / G, r = (b * c.H + h) * L + i;
        if (!in.mask[b * L + i]) continue;
        std::vector<double> s, w;  // scores and their value rows (nullptr: no value)
        std::vector<const double*> val;
        for (int64_t j = 0; j < L; ++j) {
          if (!in.mask[b * L + j]) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += in.q[r * D + d] * in.k[((b * c.Hkv + hk) * L + j) * D + d];
          s.push_back(dot * scale);
          val.push_back(&in.v[((b * c.Hkv + hk) * L + j) * D]);
        }
        if (with_sink && c.token) {
          const int64_t o = ((c.per_batch ? b : 0) * c.Hkv + hk) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += in.q[r * D + d] * in.sk[o + d];
          s.push_back(dot * scale);
          val.push_back(&in.sv[o]);
        }
        if (with_sink && c.logit) {
          s.push_back(in.lam[h]);
          val.push_back(nullptr);
        }
        double mx = -INFINITY, sum = 0;
        for (double x : s) mx = std::max(mx, x);
        for (double x : s) sum += std::exp(x - mx);
        lse[r] = mx + std::log(sum);
        for (size_t j = 0; j < s.size(); ++j)
          if (val[j] != nullptr)
            for (int64_t d = 0; d < D; ++d) out[r * D + d] += std::exp(s[j] - lse[r]) * val[j][d];
      }
}

Inputs make_inputs(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  auto randn = [&](int64_t n) {
    std::vector<double> x(n);
    for (auto& e : x) e = n01(rng);
    return x;
  };
  Inputs in;
  in.q = randn(c.B * c.H * c.L * c.D);
  in.k = randn(c.B * c.Hkv * c.L * c.D), in.v = randn(c.B * c.Hkv * c.L * c.D);
  in.sk = randn(sink_rows(c) * c.D), in.sv = randn(sink_rows(c) * c.D), in.lam = randn(c.H);
  in.mask.reset(new bool[c.B * c.L]);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t i = 0; i < c.L; ++i)  // batch b: its first b tokens padded (batch 0 unpadded)
      in.mask[b * c.L + i] = !c.padding || i >= b;
  dense(c, in, false, in.attn_out, in.attn_lse);
  return in;
}

sinkdlm::Strides4 contiguous_strides(int64_t H, int64_t L, int64_t D) {
  return {H * L * D, L * D, D, 1};
}

template <typename T, typename A>
sinkdlm::SinkMergeParams<T, A> fwd_params(const Case& c, const std::vector<T>& q,
                                          const std::vector<T>& attn_out,
                                          const std::vector<A>& attn_lse, const std::vector<A>& sk,
                                          const std::vector<A>& sv, const std::vector<A>& lam,
                                          const bool* mask, std::vector<T>& out,
                                          std::vector<A>& lse) {
  sinkdlm::SinkMergeParams<T, A> p{};
  p.batch = c.B, p.heads = c.H, p.kv_heads = c.Hkv, p.seq_len = c.L, p.head_dim = c.D;
  p.scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(c.D)));
  p.q = q.data(), p.q_stride = contiguous_strides(c.H, c.L, c.D);
  p.attn_out = attn_out.data(), p.attn_out_stride = contiguous_strides(c.H, c.L, c.D);
  p.attn_lse = attn_lse.data();
  p.attn_lse_stride = {c.H * c.L, c.L, 1};
  if (c.token) p.sink_k = sk.data(), p.sink_v = sv.data();
  p.sink_batch_stride = c.per_batch ? c.Hkv * c.D : 0;
  if (c.logit) p.sink_logit = lam.data();
  p.row_mask = c.padding ? mask : nullptr;
  out.assign(c.B * c.H * c.L * c.D, T(-7));  // poisoned
  lse.assign(c.B * c.H * c.L, A(-7));
  p.out = out.data(), p.out_stride = contiguous_strides(c.H, c.L, c.D);
  p.lse = lse.data();
  return p;
}

const Case kCases[] = {
    {2, 4, 2, 5, 8, true, false, false, false}, {2, 4, 2, 5, 8, true, true, true, true},
    {3, 4, 1, 7, 5, false, false, true, true},  {1, 2, 2, 1, 3, true, true, false, false},
    {2, 6, 3, 9, 16, true, false, true, true},
};

TEST(SinkMergeCpu, ForwardMatchesDenseFloat64) {
  const CpuContext ctx = serial_context();
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, 7 + c.L);
    std::vector<double> want_out, want_lse, out, lse;
    dense(c, in, true, want_out, want_lse);
    sink_merge_fwd_cpu(fwd_params<double, double>(c, in.q, in.attn_out, in.attn_lse, in.sk, in.sv,
                                                  in.lam, in.mask.get(), out, lse),
                       ctx);
    for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], want_out[i], 1e-13) << i;
    for (size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(lse[i], want_lse[i], 1e-13) << i;
  }
}

TEST(SinkMergeCpu, AliasedOutputMatches) {  // out written over attn_out, as the op may do
  const CpuContext ctx = serial_context();
  const Case c = kCases[1];
  const Inputs in = make_inputs(c, 3);
  std::vector<double> want_out, want_lse, lse, scratch;
  dense(c, in, true, want_out, want_lse);
  std::vector<double> buf = in.attn_out;
  auto p = fwd_params<double, double>(c, in.q, buf, in.attn_lse, in.sk, in.sv, in.lam,
                                      in.mask.get(), scratch, lse);
  p.out = buf.data();
  sink_merge_fwd_cpu(p, ctx);
  for (size_t i = 0; i < buf.size(); ++i) EXPECT_NEAR(buf[i], want_out[i], 1e-13) << i;
}

// loss = sum dO * out' + sum g * lse' of the merge, for central differences.
double merge_loss(const Case& c, const Inputs& in, const std::vector<double>& q,
                  const std::vector<double>& sk, const std::vector<double>& sv,
                  const std::vector<double>& lam, const std::vector<double>& dout,
                  const std::vector<double>& dlse) {
  std::vector<double> out, lse;
  sink_merge_fwd_cpu(fwd_params<double, double>(c, q, in.attn_out, in.attn_lse, sk, sv, lam,
                                                in.mask.get(), out, lse),
                     serial_context());
  double loss = 0;
  for (size_t i = 0; i < out.size(); ++i) loss += dout[i] * out[i];
  for (size_t i = 0; i < lse.size(); ++i) loss += dlse[i] * lse[i];
  return loss;
}

struct Grads {
  std::vector<double> dq, dsk, dsv, dlam;
};

Grads run_bwd(const Case& c, const Inputs& in, const std::vector<double>& dout,
              const std::vector<double>& dlse, const CpuContext& ctx) {
  std::vector<double> out, lse;
  sink_merge_fwd_cpu(fwd_params<double, double>(c, in.q, in.attn_out, in.attn_lse, in.sk, in.sv,
                                                in.lam, in.mask.get(), out, lse),
                     ctx);
  Grads g;
  g.dq.assign(in.q.size(), 0.0);
  g.dsk.assign(in.sk.size(), -7.0), g.dsv.assign(in.sv.size(), -7.0), g.dlam.assign(c.H, -7.0);
  sinkdlm::SinkMergeBwdParams<double, double> p{};
  p.batch = c.B, p.heads = c.H, p.kv_heads = c.Hkv, p.seq_len = c.L, p.head_dim = c.D;
  p.scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  p.q = in.q.data(), p.q_stride = contiguous_strides(c.H, c.L, c.D);
  p.dout = dout.data(), p.dout_stride = contiguous_strides(c.H, c.L, c.D);
  p.out = out.data(), p.out_stride = contiguous_strides(c.H, c.L, c.D);
  p.lse = lse.data(), p.dlse = dlse.data();
  if (c.token) p.sink_k = in.sk.data(), p.sink_v = in.sv.data();
  p.sink_batch_stride = c.per_batch ? c.Hkv * c.D : 0;
  if (c.logit) p.sink_logit = in.lam.data();
  p.row_mask = c.padding ? in.mask.get() : nullptr;
  p.dq = g.dq.data(), p.dq_stride = contiguous_strides(c.H, c.L, c.D);
  if (c.token) p.dsink_k = g.dsk.data(), p.dsink_v = g.dsv.data();
  if (c.logit) p.dsink_logit = g.dlam.data();
  sink_merge_bwd_cpu(p, ctx);
  return g;
}

TEST(SinkMergeCpu, BackwardMatchesFiniteDifferences) {
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, 11 + c.D);
    std::mt19937 rng(5);
    std::normal_distribution<double> n01(0.0, 1.0);
    std::vector<double> dout(in.q.size()), dlse(c.B * c.H * c.L);
    for (auto& x : dout) x = n01(rng);
    for (auto& x : dlse) x = n01(rng);
    const Grads g = run_bwd(c, in, dout, dlse, serial_context());
    const double h = 1e-6;
    auto check = [&](std::vector<double> x, const std::vector<double>& grad, int which,
                     const char* name) {
      for (size_t i = 0; i < x.size(); ++i) {
        const double x0 = x[i];
        auto loss_at = [&](double xi) {
          x[i] = xi;
          return merge_loss(c, in, which == 0 ? x : in.q, which == 1 ? x : in.sk,
                            which == 2 ? x : in.sv, which == 3 ? x : in.lam, dout, dlse);
        };
        const double fd = (loss_at(x0 + h) - loss_at(x0 - h)) / (2 * h);
        x[i] = x0;
        EXPECT_NEAR(grad[i], fd, 1e-6 * (1 + std::abs(fd))) << name << " " << i;
      }
    };
    check(in.q, g.dq, 0, "dq");
    if (c.token) check(in.sk, g.dsk, 1, "dsink_k"), check(in.sv, g.dsv, 2, "dsink_v");
    if (c.logit) check(in.lam, g.dlam, 3, "dsink_logit");
  }
}

TEST(SinkMergeCpu, BackwardIsDeterministic) {  // same bits whatever the split of the work
  const Case c = kCases[4];
  const Inputs in = make_inputs(c, 2);
  std::vector<double> dout(in.q.size(), 0.25), dlse(c.B * c.H * c.L, -0.5);
  for (size_t i = 0; i < dout.size(); ++i) dout[i] = std::sin(static_cast<double>(i));
  const Grads a = run_bwd(c, in, dout, dlse, serial_context());
  const Grads b = run_bwd(c, in, dout, dlse, reversed_context());
  EXPECT_EQ(a.dq, b.dq);
  EXPECT_EQ(a.dsk, b.dsk);
  EXPECT_EQ(a.dsv, b.dsv);
  EXPECT_EQ(a.dlam, b.dlam);
}

TEST(SinkMergeCpu, Bfloat16ForwardNearFloat64) {
  const CpuContext ctx = serial_context();
  const Case c = kCases[4];
  const Inputs in = make_inputs(c, 9);
  std::vector<double> want_out, want_lse;
  dense(c, in, true, want_out, want_lse);
  auto to_bf16 = [](const std::vector<double>& x) {
    std::vector<sinkdlm::bfloat16> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = sinkdlm::to_bfloat16(static_cast<float>(x[i]));
    return y;
  };
  auto to_f32 = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
  std::vector<sinkdlm::bfloat16> out;
  std::vector<float> lse;
  sink_merge_fwd_cpu(fwd_params<sinkdlm::bfloat16, float>(
                         c, to_bf16(in.q), to_bf16(in.attn_out), to_f32(in.attn_lse), to_f32(in.sk),
                         to_f32(in.sv), to_f32(in.lam), in.mask.get(), out, lse),
                     ctx);
  for (size_t i = 0; i < out.size(); ++i)
    EXPECT_NEAR(sinkdlm::to_float(out[i]), want_out[i], 2e-2) << i;
  for (size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(lse[i], want_lse[i], 2e-2) << i;
}

}  // namespace
