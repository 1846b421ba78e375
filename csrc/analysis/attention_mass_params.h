// Arguments of the attention-mass kernels (CPU: attention_mass_cpu.h, CUDA: cuda/attention_mass.h).
// Plain C++ with no torch or CUDA headers, so both kernel libraries can include it.
#pragma once

#include <cstdint>

#include "../sink_attention/sink_attention_params.h"  // relative: cuda/ builds without csrc/

namespace sinkdlm {

// dtype: float32 or float64 (the accumulation type, so sink_k and sink_logit have it too).
// Outputs (contiguous): mass (B,H,L) and sink_mass (B,H): the softmax mass each key receives,
// averaged over the S real query rows of each sequence (0 when S = 0); padded keys get 0.
// sink_mass adds the key sink and the logit sink when both are given.
struct AttentionMassParams : AttentionScoreParams {
  // q and k are bfloat16 (the CPU kernel only; dtype stays float32 for everything else): the
  // score GEMMs then run bfloat16 x bfloat16 -> float32.
  bool qk_bfloat16 = false;
  const void* lse = nullptr;  // the call's log-sum-exp (B,H,L), contiguous, dtype
  void* mass = nullptr;
  void* sink_mass = nullptr;
};

}  // namespace sinkdlm
