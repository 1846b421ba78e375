// Arguments of the attention-mass kernels (CPU: attention_mass_cpu.h, CUDA: cuda/attention_mass.h).
// Plain C++ with no torch or CUDA headers, so both kernel libraries can include it.
#pragma once

#include <cstdint>

namespace sinkdlm {

// Shapes: q (B,H,L,D), k (B,Hkv,L,D), lse (B,H,L), optional sink_k (B,Hkv,D) (batch stride 0 when
// shared), optional sink_logit (H), optional key_padding_mask (B,L) with true = real token.
// Outputs (contiguous): mass (B,H,L) and sink_mass (B,H): the softmax mass each key receives,
// averaged over the S real query rows of each sequence (0 when S = 0); padded keys get 0.
// sink_mass adds the key sink and the logit sink when both are given. Strides are in elements.
template <typename T>
struct AttentionMassParams {
  const T* q = nullptr;
  int64_t q_stride[4] = {0, 0, 0, 0};
  const T* k = nullptr;
  int64_t k_stride[4] = {0, 0, 0, 0};
  const T* lse = nullptr;
  int64_t lse_stride[3] = {0, 0, 0};
  const T* sink_k = nullptr;
  int64_t sink_k_stride[3] = {0, 0, 0};
  const T* sink_logit = nullptr;
  int64_t sink_logit_stride = 0;
  const bool* key_padding_mask = nullptr;
  int64_t mask_stride[2] = {0, 0};
  T* mass = nullptr;
  T* sink_mass = nullptr;
  int64_t batch = 0, heads = 0, kv_heads = 0, seq_len = 0, head_dim = 0;
  double scale = 1.0;
};

}  // namespace sinkdlm
