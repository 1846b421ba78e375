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

namespace sinkdlm {

// T: element type of q, out and dO (float, double, float16, bfloat16). A: accumulation type of
// lse and the sink (double for double, else float). Strides are in elements; the last dimension
// of q, attn_out, dout and out may have any stride on the CPU, must be unit on CUDA.
template <typename T, typename A>
struct SinkMergeParams {
  int64_t batch, heads, kv_heads, seqlen, head_dim;
  A scale;
  const T* q;  // (B, H, L, D)
  int64_t q_stride[4];
  const T* attn_out;  // attention over the real keys only (B, H, L, D)
  int64_t attn_out_stride[4];
  const A* attn_lse;  // its log-sum-exp (B, H, L)
  int64_t attn_lse_stride[3];
  // Sink token (B or 1, Hkv, D) contiguous; sink_batch_stride is 0 for one sink shared by the
  // batch. Null: no sink token.
  const A* sink_k;
  const A* sink_v;
  int64_t sink_batch_stride;
  const A* sink_logit;   // (H,); null: no logit sink
  const bool* row_mask;  // (B, L) contiguous, true = real row; null: all real
  T* out;                // (B, H, L, D); padded rows get 0
  int64_t out_stride[4];
  A* lse;  // (B, H, L) contiguous; padded rows get 0
};

template <typename T, typename A>
struct SinkGradParams {
  int64_t batch, heads, kv_heads, seqlen, head_dim;
  A scale;
  const T* q;  // (B, H, L, D)
  int64_t q_stride[4];
  const T* dout;  // (B, H, L, D)
  int64_t dout_stride[4];
  const T* out;  // the merged out' (B, H, L, D)
  int64_t out_stride[4];
  const A* lse;   // the merged lse' (B, H, L) contiguous
  const A* dlse;  // (B, H, L) contiguous; null: no gradient through lse
  const A* sink_k;
  const A* sink_v;
  int64_t sink_batch_stride;
  const A* sink_logit;
  const bool* row_mask;
  T* dq;  // (B, H, L, D), updated in place: dq += scale * ds * sink_k (only with a sink token)
  int64_t dq_stride[4];
  A* dsink_k;      // like sink_k (B or 1, Hkv, D) contiguous; null without a sink token
  A* dsink_v;      // like sink_v
  A* dsink_logit;  // (H,); null without a logit sink
};

}  // namespace sinkdlm
