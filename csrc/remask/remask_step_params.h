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
  bool has_threshold = false;
  float threshold = 0.0f;
  uint64_t seed = 0;  // Philox key (see philox.h)
  uint32_t offset = 0;
  // Outputs, contiguous (B, L).
  int64_t* x_new = nullptr;
  bool* transferred = nullptr;
  float* confidence = nullptr;
};

// Positions are ranked by a 64-bit key: the confidence's bits made order-preserving in the high
// word, and the complemented position in the low word, so that all keys differ and equal
// confidences rank the lower position first.
#if defined(__CUDACC__)
__host__ __device__ __forceinline__
#else
inline
#endif
    uint64_t rank_key(float confidence, int64_t position) {
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
