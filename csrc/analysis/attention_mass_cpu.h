// Attention mass per key, Ā_j = (1/S) Σ_i softmax_i(j), for one attention call, computed from the
// forward's log-sum-exp in a second pass over the keys: memory O(L·D) per head, never L×L.
// Torch-free: raw pointers and element strides. Used by csrc/analysis/attention_mass_ops.cpp.
#pragma once

#include <cstdint>

namespace sinkdlm {

// Shapes: q (B,H,L,D), k (B,Hkv,L,D), lse (B,H,L), optional sink_k (B,Hkv,D) (batch stride 0 when
// shared), optional sink_logit (H), optional key_padding_mask (B,L) with true = real token.
// Outputs (contiguous): mass (B,H,L) and sink_mass (B,H): the mass averaged over the S real query
// rows of each sequence (0 when S = 0); padded keys get 0. sink_mass adds the key sink and the
// logit sink when both are given.
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

// Computes the (batch, head) pairs with flat index bh in [bh_begin, bh_end), so callers can split
// the work across threads. Returns false (and writes nothing) if the parameters are inconsistent.
template <typename T>
bool attention_mass_cpu(const AttentionMassParams<T>& p, int64_t bh_begin, int64_t bh_end);

}  // namespace sinkdlm
