// GoogleTest of the torch-free remasking core against a direct double-precision implementation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "common/cpu_context.h"
#include "remask/philox.h"
#include "remask/remask_step_cpu.h"

namespace sinkdlm {
namespace remask {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

const CpuContext kSerial = make_cpu_context(serial_for);

struct Case {
  int64_t batch, seq_len, vocab;
  Strategy strategy;
  float temperature;
  bool has_threshold;
  bool count_floor;  // with a threshold: num_transfer is a floor (the hybrid rule)
  float threshold;
  bool with_window;
};

struct Outputs {
  std::vector<int64_t> x_new;
  std::vector<uint8_t> transferred;
  std::vector<float> confidence;
};

// Straightforward per-position softmax in double; candidates through the same noise.
Outputs expected(const Case& c, const std::vector<float>& logits, const std::vector<int64_t>& x,
                 int64_t mask_id, const std::vector<int64_t>& num_transfer,
                 const std::vector<int64_t>& window, uint64_t seed, uint32_t offset) {
  const int64_t B = c.batch, L = c.seq_len, V = c.vocab;
  Outputs out{x, std::vector<uint8_t>(B * L, 0), std::vector<float>(B * L, -kInf)};
  const float inv_t = c.temperature > 0 ? static_cast<float>(1.0 / c.temperature) : 0.0f;
  std::vector<int64_t> candidate(B * L);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = c.with_window ? window[2 * b] : 0,
                  end = c.with_window ? window[2 * b + 1] : L;
    for (int64_t l = start; l < end; ++l) {
      if (x[b * L + l] != mask_id) continue;
      const float* row = &logits[(b * L + l) * V];
      int64_t best = 0;
      float best_score = -kInf;
      for (int64_t v = 0; v < V; ++v) {
        float score = row[v];
        if (inv_t > 0) {
          score = row[v] * inv_t;
          score += philox::gumbel(seed, offset, b, l, v);
        }
        if (score > best_score) best_score = score, best = v;
      }
      const double m = *std::max_element(row, row + V);
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - m);
      std::vector<double> p(V);
      for (int64_t v = 0; v < V; ++v) p[v] = std::exp(row[v] - m) / sum;
      std::vector<double> sorted = p;
      std::sort(sorted.rbegin(), sorted.rend());
      double conf = 0;
      if (c.strategy == Strategy::kLowConfidence) conf = p[best];
      if (c.strategy == Strategy::kMargin) conf = sorted[0] - (V > 1 ? sorted[1] : 0.0);
      if (c.strategy == Strategy::kEntropy) {
        for (double q : p) conf += q > 0 ? q * std::log(q) : 0.0;
      }
      if (c.strategy == Strategy::kRandom) conf = philox::position_uniform(seed, offset, b, l);
      candidate[b * L + l] = best;
      out.confidence[b * L + l] = static_cast<float>(conf);
    }
    std::vector<int64_t> order;
    for (int64_t l = start; l < end; ++l) {
      if (x[b * L + l] == mask_id) order.push_back(l);
    }
    const float* conf = &out.confidence[b * L];
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t i, int64_t j) { return conf[i] > conf[j]; });
    // Without a threshold the schedule's count; with one the single best (Fast-dLLM), or with
    // count_floor at least the count.
    int64_t k = num_transfer[b];
    if (c.has_threshold) k = c.count_floor ? std::max<int64_t>(k, 1) : 1;
    k = std::min<int64_t>(k, order.size());
    for (size_t r = 0; r < order.size(); ++r) {
      const int64_t l = order[r];
      if (static_cast<int64_t>(r) < k || (c.has_threshold && conf[l] >= c.threshold)) {
        out.transferred[b * L + l] = 1;
        out.x_new[b * L + l] = candidate[b * L + l];
      }
    }
  }
  return out;
}

void run_case(const Case& c, uint32_t rng_seed) {
  const int64_t B = c.batch, L = c.seq_len, V = c.vocab, mask_id = V - 1;
  std::mt19937 rng(rng_seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(B * L * V);
  for (float& value : logits) value = normal(rng);
  std::vector<int64_t> x(B * L), num_transfer(B), window(2 * B);
  std::uniform_int_distribution<int64_t> token(0, V - 2);
  for (int64_t i = 0; i < B * L; ++i) x[i] = (rng() % 3 == 0) ? token(rng) : mask_id;
  for (int64_t b = 0; b < B; ++b) {
    num_transfer[b] = rng() % (L + 2);
    window[2 * b] = rng() % (L + 1);
    window[2 * b + 1] = window[2 * b] + rng() % (L - window[2 * b] + 1);
  }
  const uint64_t seed = 0x0123456789ABCDEFull + rng_seed;
  const uint32_t offset = 7;

  RemaskStepParams p;
  p.logits_dtype = ScalarType::kFloat32;
  p.batch = B, p.seq_len = L, p.vocab = V;
  p.logits = logits.data(), p.logits_stride = {L * V, V};
  p.x = x.data(), p.x_stride = {L, 1};
  p.mask_id = mask_id;
  p.num_transfer = num_transfer.data();
  p.window = c.with_window ? window.data() : nullptr;
  p.strategy = c.strategy;
  p.inv_temperature = c.temperature > 0 ? static_cast<float>(1.0 / c.temperature) : 0.0f;
  p.has_threshold = c.has_threshold, p.count_floor = c.count_floor, p.threshold = c.threshold;
  p.seed = seed, p.offset = offset;
  std::vector<int64_t> x_new(B * L, -12345);
  bool* transferred = new bool[B * L];
  std::memset(transferred, 1, B * L);
  std::vector<float> confidence(B * L, std::nanf(""));
  p.x_new = x_new.data(), p.transferred = transferred, p.confidence = confidence.data();
  remask_step_cpu(p, kSerial);

  const Outputs want = expected(c, logits, x, mask_id, num_transfer, window, seed, offset);
  for (int64_t i = 0; i < B * L; ++i) {
    SCOPED_TRACE(testing::Message() << "position " << i);
    EXPECT_EQ(x_new[i], want.x_new[i]);
    EXPECT_EQ(transferred[i], want.transferred[i] != 0);
    if (std::isinf(want.confidence[i])) {
      EXPECT_EQ(confidence[i], want.confidence[i]);
    } else {
      EXPECT_NEAR(confidence[i], want.confidence[i], 2e-6 + 2e-6 * std::abs(want.confidence[i]));
    }
  }
  delete[] transferred;
}

TEST(RemaskStepCpu, AllStrategiesTemperaturesWindowsThresholds) {
  uint32_t rng_seed = 1;
  for (Strategy strategy :
       {Strategy::kLowConfidence, Strategy::kMargin, Strategy::kEntropy, Strategy::kRandom}) {
    for (float temperature : {0.0f, 0.7f}) {
      for (bool with_window : {false, true}) {
        // No threshold; Fast-dLLM's threshold rule; the hybrid (count_floor).
        for (int rule = 0; rule < 3; ++rule) {
          // V = 37 (odd, below one chunk) and 4099 (several chunks plus a remainder).
          for (int64_t vocab : {37, 4099}) {
            const float threshold = strategy == Strategy::kEntropy ? -2.0f : 0.3f;
            run_case(Case{3, 9, vocab, strategy, temperature, rule > 0, rule == 2, threshold,
                          with_window},
                     rng_seed++);
          }
        }
      }
    }
  }
}

TEST(RemaskStepCpu, TiesPickLowerTokenAndLowerPosition) {
  // Every position has identical logits with a two-way tie for the top token.
  const int64_t B = 1, L = 6, V = 10, mask_id = 9;
  std::vector<uint16_t> logits(B * L * V);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t v = 0; v < V; ++v) logits[l * V + v] = 0x3F80;  // bf16 1.0
    logits[l * V + 3] = 0x4000;                                  // bf16 2.0
    logits[l * V + 5] = 0x4000;
  }
  std::vector<int64_t> x(L, mask_id), num_transfer{2}, x_new(L);
  x[1] = 4;
  bool transferred[L];
  std::vector<float> confidence(L);
  RemaskStepParams p;
  p.logits_dtype = ScalarType::kBFloat16;
  p.batch = B, p.seq_len = L, p.vocab = V;
  p.logits = logits.data(), p.logits_stride = {L * V, V};
  p.x = x.data(), p.x_stride = {L, 1}, p.mask_id = mask_id;
  p.num_transfer = num_transfer.data();
  p.x_new = x_new.data(), p.transferred = transferred, p.confidence = confidence.data();
  remask_step_cpu(p, kSerial);
  const std::vector<int64_t> want{3, 4, 3, mask_id, mask_id, mask_id};
  EXPECT_EQ(x_new, want);
  const double e = std::exp(1.0), p_top = e / (2 * e + 8);
  EXPECT_NEAR(confidence[0], p_top, 1e-6);
  EXPECT_EQ(confidence[1], -kInf);
}

TEST(RemaskStepCpu, NoiseIsAPureFunctionOfItsCounter) {
  std::vector<float> gumbel(2 * 3 * 5), uniform(2 * 3);
  remask_step_noise_cpu(42, 3, 2, 3, 5, gumbel.data(), uniform.data(), kSerial);
  EXPECT_EQ(gumbel[(1 * 3 + 2) * 5 + 4], philox::gumbel(42, 3, 1, 2, 4));
  EXPECT_EQ(uniform[1 * 3 + 2], philox::position_uniform(42, 3, 1, 2));
  // The vectorised noise (32 entries at a time) has the scalar noise's bits.
  std::vector<float> wide(2 * 3 * 101);
  remask_step_noise_cpu(0xFEEDFACECAFEBEEFull, 9, 2, 3, 101, wide.data(), nullptr, kSerial);
  for (int64_t i = 0; i < 2 * 3 * 101; ++i) {
    const float scalar = philox::gumbel(0xFEEDFACECAFEBEEFull, 9, i / 303, (i / 101) % 3, i % 101);
    ASSERT_EQ(wide[i], scalar) << "entry " << i;
  }
  // The log behind the noise, against libm.
  for (float x : {3e-8f, 1e-5f, 0.1f, 0.70710677f, 0.70710683f, 0.999999f, 1.0f, 1.5f, 17.3f}) {
    EXPECT_NEAR(philox::log_positive(x), std::log(static_cast<double>(x)),
                3e-7 * std::max(1.0, std::abs(std::log(static_cast<double>(x)))))
        << x;
  }
  EXPECT_NE(philox::gumbel(42, 3, 1, 2, 4), philox::gumbel(43, 3, 1, 2, 4));
  EXPECT_NE(philox::gumbel(42, 3, 1, 2, 4), philox::gumbel(42, 4, 1, 2, 4));
  // Known-answer test: Random123's philox4x32-10 vector for counter = key = 0.
  const philox::Uint4 r = philox::philox4x32_10(philox::Uint4{0, 0, 0, 0}, 0, 0);
  EXPECT_EQ(r.x, 0x6627e8d5u);
  EXPECT_EQ(r.y, 0xe169c58du);
  EXPECT_EQ(r.z, 0xbc57ac4cu);
  EXPECT_EQ(r.w, 0x9b00dbd8u);
}

}  // namespace
}  // namespace remask
}  // namespace sinkdlm
