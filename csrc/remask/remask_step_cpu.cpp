#include "remask/remask_step_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/half.h"
#include "common/row_ops.h"
#include "common/target_clones.h"
#include "remask/philox.h"

namespace sinkdlm {
namespace remask {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Logits are read in chunks that stay in L1 while the chunk's max, argmax and exp-sums are
// taken, so memory sees one pass over the vocabulary.
constexpr int64_t kChunk = 2048;

inline float to_float(float value) { return value; }  // next to half.h's bfloat16/float16 ones

template <typename T>
__attribute__((always_inline)) inline float convert_and_max_impl(const T* src, int64_t n,
                                                                 float* out, int* has_nan) {
  float max = -kInf;
  int nan = 0;
#pragma omp simd reduction(max : max) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = to_float(src[i]);
    max = out[i] > max ? out[i] : max;
    nan |= out[i] != out[i];
  }
  *has_nan |= nan;
  return max;
}

// Converts a chunk to float32 into `out` and returns its max (NaN entries skipped; `has_nan`
// set when there is one).
SINKDLM_TARGET_CLONES(SINKDLM_ISAS_NO_FMA)
float convert_and_max(const float* src, int64_t n, float* out, int* nan) {
  return convert_and_max_impl(src, n, out, nan);
}
SINKDLM_TARGET_CLONES(SINKDLM_ISAS_NO_FMA)
float convert_and_max(const float16* src, int64_t n, float* out, int* nan) {
  return convert_and_max_impl(src, n, out, nan);
}
SINKDLM_TARGET_CLONES(SINKDLM_ISAS_NO_FMA)
float convert_and_max(const bfloat16* src, int64_t n, float* out, int* nan) {
  return convert_and_max_impl(src, n, out, nan);
}

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_NO_FMA)
void scale(const float* values, int64_t n, float factor, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = values[i] * factor;
}

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_NO_FMA) float max_of(const float* values, int64_t n) {
  float max = -kInf;
#pragma omp simd reduction(max : max)
  for (int64_t i = 0; i < n; ++i) max = values[i] > max ? values[i] : max;
  return max;
}

// Max over all entries but `skip`.
SINKDLM_TARGET_CLONES(SINKDLM_ISAS_NO_FMA)
float max_except(const float* values, int64_t n, int64_t skip) {
  float max = -kInf;
#pragma omp simd reduction(max : max)
  for (int64_t i = 0; i < n; ++i) {
    const float value = i == skip ? -kInf : values[i];
    max = value > max ? value : max;
  }
  return max;
}

// The Gumbel noise below is written with GCC vector extensions (the softmax sums use row_ops).
// -Wpsabi: 32-byte vectors passed between functions of this translation unit only (all inline,
// internal linkage), so the non-AVX ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));
typedef uint32_t Uint8 __attribute__((vector_size(32)));

// ---- Gumbel noise, eight Philox counters (32 vocabulary entries) at a time. Same operations in
// the same order as philox::gumbel, so the bits agree with the scalar (and CUDA) noise.
typedef uint64_t Uint64x8 __attribute__((vector_size(64)));

inline void mulhilo8(uint32_t multiplier, Uint8 a, Uint8& hi, Uint8& lo) {
  // Hidden from the optimiser: with a known constant GCC expands the multiply into shifts and
  // adds (5x slower than one 32x32->64 vector multiply per lane pair).
  uint64_t opaque = multiplier;
  asm("" : "+r"(opaque));
  const Uint64x8 product = __builtin_convertvector(a, Uint64x8) * opaque;
  hi = __builtin_convertvector(product >> 32, Uint8);
  lo = __builtin_convertvector(product, Uint8);
}

inline Float8 log_positive8(Float8 x) {
  const Uint8 bits = (Uint8)x;
  Int8 exponent = (Int8)(bits >> 23) - 127;
  Uint8 mantissa = (bits & 0x7FFFFFu) | 0x3F800000u;
  const Int8 big = mantissa > philox::kSqrt2Bits;  // lanes: -1 where true
  mantissa = big ? mantissa - 0x00800000u : mantissa;
  exponent -= big;
  const Float8 f = (Float8)mantissa + -1.0f;
  const Float8 s = f / (f + 2.0f);
  const Float8 s2 = s * s;
  Float8 poly = s2 * (1.0f / 9.0f) + 1.0f / 7.0f;
  poly = poly * s2 + 1.0f / 5.0f;
  poly = poly * s2 + 1.0f / 3.0f;
  poly = poly * s2;
  const Float8 two_s = s + s;
  const Float8 log_m = two_s + two_s * poly;
  const Float8 e = __builtin_convertvector(exponent, Float8);
  return e * philox::kLn2Hi + (log_m + e * philox::kLn2Lo);
}

// out[i] = philox::gumbel(seed, offset, b, l, v_start + i) for i < 32; v_start a multiple of 4.
SINKDLM_TARGET_CLONES(SINKDLM_ISAS_NO_FMA)
void gumbel32(uint64_t seed, uint32_t offset, int64_t b, int64_t l, int64_t v_start, float* out) {
  Uint8 x = Uint8{0, 1, 2, 3, 4, 5, 6, 7} + static_cast<uint32_t>(v_start >> 2);
  Uint8 y = Uint8{} + static_cast<uint32_t>(l);
  Uint8 z = Uint8{} + static_cast<uint32_t>(b);
  Uint8 w = Uint8{} + offset;
  uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    Uint8 hi0, lo0, hi1, lo1;
    mulhilo8(philox::kMul0, x, hi0, lo0);
    mulhilo8(philox::kMul1, z, hi1, lo1);
    const Uint8 next_x = hi1 ^ y ^ key0, next_z = hi0 ^ w ^ key1;
    x = next_x;
    y = lo1;
    z = next_z;
    w = lo0;
    key0 += philox::kWeyl0;
    key1 += philox::kWeyl1;
  }
  const Uint8 words[4] = {x, y, z, w};
  for (int word = 0; word < 4; ++word) {
    // (Signed conversion: one instruction, exact below 2^24.)
    const Float8 u =
        (__builtin_convertvector((Int8)(words[word] >> 8), Float8) + 0.5f) * (1.0f / 16777216.0f);
    const Float8 gumbel = -log_positive8(-log_positive8(u));
    for (int counter = 0; counter < 8; ++counter) out[4 * counter + word] = gumbel[counter];
  }
}

// out[i] = philox::gumbel(seed, offset, b, l, v) for v in [v_start, v_start + n), v_start a
// multiple of 4.
void gumbel_range(uint64_t seed, uint32_t offset, int64_t b, int64_t l, int64_t v_start, int64_t n,
                  float* out) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) gumbel32(seed, offset, b, l, v_start + i, out + i);
  for (; i < n; ++i) out[i] = philox::gumbel(seed, offset, b, l, v_start + i);
}

struct PositionConfig {
  Strategy strategy;
  bool noisy;
  float inv_temperature;
  uint64_t seed;
  uint32_t offset;
};

struct PositionResult {
  int64_t token;
  float confidence;
};

inline int64_t first_index_of(const float* values, int64_t n, float target) {
  for (int64_t i = 0; i < n; ++i) {
    if (values[i] == target) return i;
  }
  return 0;
}

// Asks for the next chunk's cache lines while this one's exps are computed: the loop alternates
// a memory-bound conversion with a compute-bound exp pass, and without this the memory system
// idles during the second (the hardware prefetcher does not run that far ahead on every CPU).
template <typename T>
inline void prefetch(const T* src, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(src);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(T)); offset += 64)
    __builtin_prefetch(bytes + offset, 0, 3);
}

// One pass over a position's logits: candidate token and confidence.
template <typename T>
PositionResult scan_position(const T* row, int64_t vocab, const PositionConfig& config, int64_t b,
                             int64_t l) {
  alignas(64) float logits[kChunk];
  alignas(64) float scores[kChunk];
  alignas(64) float noise[kChunk];
  const bool need_softmax = config.strategy != Strategy::kRandom;
  const bool need_entropy = config.strategy == Strategy::kEntropy;
  const bool need_second = config.strategy == Strategy::kMargin;

  float best_score = -kInf, best_logit = -kInf;
  int64_t best_index = 0;
  float top1 = -kInf, top2 = -kInf;
  // Online softmax: sum = sum e^(x - running_max), weighted = sum e^(x - running_max) (x -
  // running_max).
  float running_max = -kInf;
  double sum = 0.0, weighted = 0.0;
  // Non-finite logits (the rule the reference follows too): a NaN, or no logit above -inf,
  // leaves the distribution undefined (confidence NaN: the op raises); +inf logits share all
  // the probability (n_inf of them, 1 / n_inf each).
  int has_nan = 0;
  int64_t n_inf = 0;

  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const T* src = row + start;
    const float chunk_max = convert_and_max(src, n, logits, &has_nan);
    prefetch(src + n, std::min(kChunk, vocab - start - n));
    if (chunk_max == kInf) n_inf += std::count(logits, logits + n, kInf);

    const float* candidate_scores = logits;
    float score_max = chunk_max;
    if (config.noisy) {
      scale(logits, n, config.inv_temperature, scores);
      // Added in a separate loop so that no compiler fuses the multiply-add (the reference
      // rounds the product first).
      gumbel_range(config.seed, config.offset, b, l, start, n, noise);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) scores[i] += noise[i];
      score_max = max_of(scores, n);
      candidate_scores = scores;
    }
    if (score_max > best_score) {  // strict: ties keep the lower vocabulary index
      const int64_t i = first_index_of(candidate_scores, n, score_max);
      best_score = score_max;
      best_index = start + i;
      best_logit = logits[i];
    }

    if (need_second) {
      const float second = max_except(logits, n, first_index_of(logits, n, chunk_max));
      if (chunk_max > top1) {
        top2 = std::max(top1, second);
        top1 = chunk_max;
      } else {
        top2 = std::max(top2, chunk_max);
      }
    }

    // An all -inf chunk adds nothing; once a +inf is seen the sums are not needed.
    if (need_softmax && n_inf == 0 && chunk_max > -kInf) {
      if (chunk_max > running_max) {
        if (sum > 0.0) {
          const double shift = static_cast<double>(running_max) - chunk_max;
          const double scale = std::exp(shift);
          weighted = scale * (weighted + sum * shift);
          sum *= scale;
        }
        running_max = chunk_max;
      }
      if (need_entropy) {
        float chunk_weighted = 0.0f;
        sum += row::sum_exp(logits, n, running_max, &chunk_weighted);
        weighted += chunk_weighted;
      } else {
        sum += row::sum_exp(logits, n, running_max);
      }
    }
  }

  double confidence = 0.0;
  if (has_nan || best_logit == -kInf) {
    confidence = std::numeric_limits<double>::quiet_NaN();
  } else if (n_inf > 0 && config.strategy != Strategy::kRandom) {
    const double share = 1.0 / static_cast<double>(n_inf);
    confidence = config.strategy == Strategy::kLowConfidence ? (best_logit == kInf ? share : 0.0)
                 : config.strategy == Strategy::kMargin      ? (n_inf == 1 ? 1.0 : 0.0)
                                                             : std::log(share);
  } else {
    switch (config.strategy) {
      case Strategy::kLowConfidence:
        confidence = std::exp(static_cast<double>(best_logit) - running_max) / sum;
        break;
      case Strategy::kMargin:
        confidence = (std::exp(static_cast<double>(top1) - running_max) -
                      std::exp(static_cast<double>(top2) - running_max)) /
                     sum;
        break;
      case Strategy::kEntropy:
        confidence = weighted / sum - std::log(sum);
        break;
      case Strategy::kRandom:
        confidence = philox::position_uniform(config.seed, config.offset, b, l);
        break;
    }
  }
  return PositionResult{best_index, static_cast<float>(confidence)};
}

inline PositionResult scan_any(const RemaskStepParams& p, int64_t offset_elements,
                               const PositionConfig& config, int64_t b, int64_t l) {
  switch (p.logits_dtype) {
    case ScalarType::kFloat16:
      return scan_position(static_cast<const float16*>(p.logits) + offset_elements, p.vocab, config,
                           b, l);
    case ScalarType::kBFloat16:
      return scan_position(static_cast<const bfloat16*>(p.logits) + offset_elements, p.vocab,
                           config, b, l);
    default:  // float32 (float64 is not accepted)
      return scan_position(static_cast<const float*>(p.logits) + offset_elements, p.vocab, config,
                           b, l);
  }
}

struct Window {
  int64_t start, end;
};

inline Window row_window(const RemaskStepParams& p, int64_t b) {
  if (p.window == nullptr) return Window{0, p.seq_len};
  return Window{p.window[2 * b], p.window[2 * b + 1]};
}

inline bool is_eligible(const RemaskStepParams& p, const Window& window, int64_t b, int64_t l) {
  return l >= window.start && l < window.end &&
         p.x[b * p.x_stride.b + l * p.x_stride.l] == p.mask_id;
}

int64_t grain_for(int64_t vocab) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, vocab));
}

}  // namespace

void remask_step_cpu(const RemaskStepParams& p, const CpuContext& ctx) {
  const int64_t seq_len = p.seq_len;
  const PositionConfig config{p.strategy, p.inv_temperature > 0.0f, p.inv_temperature, p.seed,
                              p.offset};

  // Pass 1, parallel over positions: eligible positions get their candidate (provisionally in
  // x_new) and confidence; the others keep their token and get -inf.
  ctx.parallel_for(p.batch * seq_len, grain_for(p.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t position = begin; position < end; ++position) {
      const int64_t b = position / seq_len, l = position % seq_len;
      if (!is_eligible(p, row_window(p, b), b, l)) {
        p.x_new[position] = p.x[b * p.x_stride.b + l * p.x_stride.l];
        p.confidence[position] = -kInf;
        continue;
      }
      const PositionResult result = scan_any(p, b * p.logits_stride.b + l * p.logits_stride.l,
                                             config, b, p.position_offset + l);
      p.x_new[position] = result.token;
      p.confidence[position] = result.confidence;
    }
  });

  // Pass 2, parallel over rows: keep the k best-ranked candidates (and, with a threshold, every
  // candidate at least that confident); the other eligible positions stay masked.
  ctx.parallel_for(p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    for (int64_t b = begin; b < end; ++b) {
      const Window window = row_window(p, b);
      const float* confidence = p.confidence + b * seq_len;
      keys.clear();
      for (int64_t l = window.start; l < window.end; ++l) {
        if (is_eligible(p, window, b, l)) keys.push_back(rank_key(confidence[l], l));
      }
      const int64_t eligible = static_cast<int64_t>(keys.size());
      const int64_t k = ranked_count(p, b, eligible);
      uint64_t cutoff = 0;
      if (k > 0) {
        std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<>());
        cutoff = keys[k - 1];
      }
      for (int64_t l = 0; l < seq_len; ++l) {
        const int64_t position = b * seq_len + l;
        const bool eligible_here = is_eligible(p, window, b, l);
        const bool pick = eligible_here && k > 0 &&
                          (rank_key(confidence[l], l) >= cutoff ||
                           (p.has_threshold && confidence[l] >= p.threshold));
        p.transferred[position] = pick;
        if (eligible_here && !pick) p.x_new[position] = p.mask_id;
      }
    }
  });
}

void remask_step_noise_cpu(uint64_t seed, uint32_t offset, int64_t batch, int64_t seq_len,
                           int64_t vocab, float* gumbel, float* uniform, const CpuContext& ctx) {
  ctx.parallel_for(batch * seq_len, grain_for(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t position = begin; position < end; ++position) {
      const int64_t b = position / seq_len, l = position % seq_len;
      if (gumbel != nullptr) gumbel_range(seed, offset, b, l, 0, vocab, gumbel + position * vocab);
      if (uniform != nullptr) uniform[position] = philox::position_uniform(seed, offset, b, l);
    }
  });
}

}  // namespace remask
}  // namespace sinkdlm
