// The sink merged into a stock attention's result, free of torch (shared by the CPU kernels in
// sink_merge_cpu.cpp and the CUDA kernels in cuda/sink_merge.cu).
//
// A fused attention over the L real keys gives, per query row i, out_i and lse_i. The sink is one
// more key whose value is known, so the attention over [sink ; keys] is that result corrected by
// one term (and the logit sink by one more, with no value):
//   s_i    = scale * q_i . sink_k                       (sink token; lam_h = sink_logit[h])
//   lse'_i = logaddexp(lse_i, s_i, lam_h)
//   out'_i = out_i * exp(lse_i - lse'_i) + exp(s_i - lse'_i) * sink_v
// Backward: the same attention's backward fed out' and lse' gives dk, dv and the token part of dq
// exactly (it recomputes P = exp(S - lse') and rowsum(dO * out')); the sink adds, per row,
//   p_i = exp(s_i - lse'_i),  delta_i = rowsum(dO_i * out'_i),  g_i = dlse_i (0 without one)
//   ds_i = p_i * (dO_i . sink_v - delta_i + g_i),  dq_i += scale * ds_i * sink_k
//   dsink_v += p_i * dO_i,  dsink_k += scale * ds_i * q_i,  dsink_logit_h += pl_i * (g_i - delta_i)
// with pl_i = exp(lam_h - lse'_i); the sums run over the rows (and the batch for a shared sink) in
// a fixed order, so they are deterministic.
#pragma once

#include <cstdint>

#include "../common/kernel_types.h"  // relative: cuda/ builds without csrc/ on its path

namespace sinkdlm {

// T: element type of q, out and dO (float, double, float16, bfloat16). A: accumulation type of
// lse and the sink (double for double, else float). Strides are in elements; the last dimension
// of q, attn_out, out, dout and dq must have unit stride (the op passes them so: the backends'
// outputs have it, and the inputs are made so).
template <typename T, typename A>
struct SinkMergeParams {
  int64_t batch = 0, heads = 0, kv_heads = 0, seq_len = 0, head_dim = 0;  // H % Hkv == 0
  A scale = 1;
  const T* q = nullptr;  // (B, H, L, D)
  Strides4 q_stride;
  const T* attn_out = nullptr;  // attention over the real keys only (B, H, L, D)
  Strides4 attn_out_stride;
  const A* attn_lse = nullptr;  // its log-sum-exp (B, H, L)
  Strides3 attn_lse_stride;
  // Sink token (B or 1, Hkv, D) contiguous; sink_batch_stride is 0 for one sink shared by the
  // batch. Null: no sink token.
  const A* sink_k = nullptr;
  const A* sink_v = nullptr;
  int64_t sink_batch_stride = 0;
  const A* sink_logit = nullptr;   // (H,); null: no logit sink
  const bool* row_mask = nullptr;  // (B, L) contiguous, true = real row; null: all real
  T* out = nullptr;                // (B, H, L, D); padded rows get 0
  Strides4 out_stride;
  A* lse = nullptr;  // (B, H, L) contiguous; padded rows get 0
};

template <typename T, typename A>
struct SinkMergeBwdParams {
  int64_t batch = 0, heads = 0, kv_heads = 0, seq_len = 0, head_dim = 0;  // H % Hkv == 0
  A scale = 1;
  const T* q = nullptr;  // (B, H, L, D)
  Strides4 q_stride;
  const T* dout = nullptr;  // (B, H, L, D)
  Strides4 dout_stride;
  const T* out = nullptr;  // the merged out' (B, H, L, D)
  Strides4 out_stride;
  const A* lse = nullptr;   // the merged lse' (B, H, L) contiguous
  const A* dlse = nullptr;  // (B, H, L) contiguous; null: no gradient through lse
  const A* sink_k = nullptr;
  const A* sink_v = nullptr;
  int64_t sink_batch_stride = 0;
  const A* sink_logit = nullptr;
  const bool* row_mask = nullptr;
  T* dq = nullptr;  // (B, H, L, D), updated in place: dq += scale * ds * sink_k (with a sink token)
  Strides4 dq_stride;
  A* dsink_k = nullptr;      // like sink_k (B or 1, Hkv, D) contiguous; null without a sink token
  A* dsink_v = nullptr;      // like sink_v
  A* dsink_logit = nullptr;  // (H,); null without a logit sink
};

}  // namespace sinkdlm
