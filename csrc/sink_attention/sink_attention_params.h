// Arguments of the sink-attention kernels: raw pointers and element strides. Plain C++ (no torch,
// no CUDA headers), so the CPU kernel (sink_attention_cpu.h) and a CUDA kernel can both include it.
//
// Each query row i attends, non-causally, over [sink ; keys]:
//   s_sink = scale * q_i . sink_k            (optional sink token, value sink_v)
//   s_lam  = sink_logit[h]                   (optional logit sink, no value, not scaled)
//   s_ij   = scale * q_i . k_j               (real keys only)
//   out_i  = (e^{s_sink} sink_v + sum_j e^{s_ij} v_j) / (e^{s_sink} + e^{s_lam} + sum_j e^{s_ij})
//   lse_i  = log of that denominator.
// With segment ids (packed documents) the sum over j runs over i's own segment only.
// Padded query rows, and rows that see no key at all, get out = 0 and lse = 0.
#pragma once

#include <cstdint>

#include "../common/kernel_types.h"  // relative: cuda/ builds without csrc/ on its path

namespace sinkdlm {

// The accumulation type below is double for float64 and float for every other dtype.

// What the scores s of one call are computed from: the sizes, q and k, the sinks' scores and the
// padding. Shared by the sink-attention kernels and the attention-mass kernels
// (analysis/attention_mass_params.h), which recompute the scores of a call from its lse.
struct AttentionScoreParams {
  ScalarType dtype = ScalarType::kFloat32;  // of q, k and the op's other main tensors
  int64_t batch = 0, heads = 0, kv_heads = 0, seq_len = 0, head_dim = 0;  // H % Hkv == 0
  double scale = 1.0;
  // q (B, H, L, D); k (B, Hkv, L, D): dtype, any strides.
  const void* q = nullptr;
  Strides4 q_stride;
  const void* k = nullptr;
  Strides4 k_stride;
  // Sink token key (and value, where the op takes one): (B or 1, Hkv, D) contiguous in the
  // accumulation type; sink_batch_stride is 0 when one sink serves the whole batch. Null: no token.
  const void* sink_k = nullptr;
  int64_t sink_batch_stride = 0;
  // Logit sink: (H,) in the accumulation type. Null: none.
  const void* sink_logit = nullptr;
  // (B, L) contiguous, true = real token. Null: no padding.
  const bool* key_padding_mask = nullptr;
};

// dtype: float32, float64, float16 or bfloat16. The queries and the keys may differ in number
// (a block's queries over cached keys and their own): seq_len is the queries' Lq, kv_seq_len the
// keys' Lk, which k, v and key_padding_mask run over.
struct SinkAttentionParams : AttentionScoreParams {
  int64_t kv_seq_len = 0;
  // v (B, Hkv, Lk, D): dtype, any strides; sink_v like sink_k.
  const void* v = nullptr;
  Strides4 v_stride;
  const void* sink_v = nullptr;
  // (B, Lq) contiguous, true = real query. Null: every query row is real.
  const bool* query_padding_mask = nullptr;
  // Packed rows: (B, L) contiguous, each row's segment ids non-decreasing (one run of equal ids
  // per document). A query sees the sink and the keys of its own segment only. Needs Lq == Lk.
  // Null: one segment per row.
  const int64_t* segment_ids = nullptr;
  // The forward's outputs, the backward's inputs: out (B, H, Lq, D) in dtype, any strides; lse
  // (B, H, Lq) contiguous in the accumulation type.
  void* out = nullptr;
  Strides4 out_stride;
  void* lse = nullptr;
};

// The backward takes the forward's params (out and lse as the forward returned them) and these.
struct SinkAttentionBwdParams : SinkAttentionParams {
  // dout (B, H, Lq, D) in dtype, any strides; dlse optional, like lse.
  const void* dout = nullptr;
  Strides4 dout_stride;
  const void* dlse = nullptr;
  // Outputs, contiguous: dq (B, H, Lq, D), dk, dv (B, Hkv, Lk, D) in dtype; in the accumulation
  // type dsink_k, dsink_v shaped like sink_k (null when there is no sink token) and dsink_logit
  // (H,) (null when there is no logit sink). Summed over every query that saw the sink, and over
  // the batch for a shared sink.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dsink_k = nullptr;
  void* dsink_v = nullptr;
  void* dsink_logit = nullptr;
};

}  // namespace sinkdlm
