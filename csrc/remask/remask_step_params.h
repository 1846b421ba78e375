// Arguments of one batched remasking step, shared by the torch-free CPU core
// (remask_step_cpu.h) and the CUDA launcher (cuda/remask_step.h).
#pragma once

#include <cstdint>

#include "../common/kernel_types.h"  // relative: cuda/ builds without csrc/ on its path

namespace sinkdlm {
namespace remask {

// How confident the model is about filling a masked position (larger = filled first).
enum class Strategy : int32_t {
  kLowConfidence = 0,  // probability of the chosen token
  kMargin = 1,         // top-1 minus top-2 probability
  kEntropy = 2,        // negative entropy of the distribution
  kRandom = 3,         // uniform random number (Philox)
};

struct RemaskStepParams {
  ScalarType logits_dtype = ScalarType::kFloat32;  // float32, float16 or bfloat16
  int64_t batch = 0, seq_len = 0, vocab = 0;
  // logits (B, L, V): element (b, l, v) at logits + b * logits_stride.b + l * logits_stride.l + v
  // (the vocabulary dimension must be contiguous).
  const void* logits = nullptr;
  Strides2 logits_stride;
  // x (B, L) int64 current tokens, any strides.
  const int64_t* x = nullptr;
  Strides2 x_stride;
  int64_t mask_id = 0;
  const int64_t* num_transfer = nullptr;  // (B,) contiguous
  const int64_t* window = nullptr;        // (B, 2) contiguous [start, end), or null = whole row
  Strategy strategy = Strategy::kLowConfidence;
  // 0: candidate = plain argmax of the logits; > 0: argmax of (float(logit) * inv_temperature)
  // + Gumbel noise, multiplied and added in float32 in that order (references reproduce it).
  float inv_temperature = 0.0f;
  // With a threshold, a row fills its most confident eligible position plus every other at least
  // `threshold` confident (Fast-dLLM); with count_floor also at least num_transfer of them.
  bool has_threshold = false;
  bool count_floor = false;
  float threshold = 0.0f;
  uint64_t seed = 0;  // Philox key (see philox.h)
  uint32_t offset = 0;
  // The noise of position l is drawn at counter position position_offset + l: a step over one
  // block of a longer sequence draws what the step over the whole sequence would.
  int64_t position_offset = 0;
  // Outputs, contiguous (B, L).
  int64_t* x_new = nullptr;
  bool* transferred = nullptr;
  float* confidence = nullptr;
};

#if defined(__CUDACC__)
#define SINKDLM_REMASK_INLINE __host__ __device__ __forceinline__
#else
#define SINKDLM_REMASK_INLINE inline
#endif

// How many best-ranked eligible positions row b fills regardless of the threshold (the
// threshold may add more): num_transfer[b] without a threshold, 1 with one (Fast-dLLM's rule),
// max(num_transfer[b], 1) with count_floor; never more than the row has.
SINKDLM_REMASK_INLINE int64_t ranked_count(const RemaskStepParams& p, int64_t b,
                                           int64_t num_eligible) {
  int64_t k = p.num_transfer[b];
  if (p.has_threshold) k = p.count_floor && k > 1 ? k : 1;
  return k < num_eligible ? k : num_eligible;
}

// Positions are ranked by a 64-bit key: the confidence's bits made order-preserving in the high
// word, and the complemented position in the low word, so that all keys differ and equal
// confidences rank the lower position first.
SINKDLM_REMASK_INLINE uint64_t rank_key(float confidence, int64_t position) {
#if defined(__CUDA_ARCH__)
  uint32_t bits = __float_as_uint(confidence);
#else
  uint32_t bits;
  __builtin_memcpy(&bits, &confidence, sizeof(bits));
#endif
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(position));
}

}  // namespace remask
}  // namespace sinkdlm
