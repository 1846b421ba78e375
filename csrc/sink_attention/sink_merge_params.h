// Arguments of the sink merge: the sink folded into a stock attention's result, free of torch
// (shared by the CPU kernels in sink_merge_cpu.cpp and the CUDA kernels in cuda/sink_merge.cu).
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
// a fixed order, so they are deterministic. Padded rows (key_padding_mask false) take no part.
#pragma once

#include "sink_attention_params.h"  // relative: cuda/ builds without csrc/ on its path

namespace sinkdlm {

// The forward reads q, the sinks, the padding (its rows), the sizes and the scale of the
// SinkAttentionParams (k and v are not read: the attention over them is done), and writes
// out / lse from the attention's result below. dtype: float32, float64, float16, bfloat16 on
// the CPU; float32, float16, bfloat16 on CUDA, where the last dimension of q, attn_out and out
// must have unit stride. out may alias attn_out when both have the same strides.
struct SinkMergeParams : SinkAttentionParams {
  const void* attn_out = nullptr;  // (B, H, L, D) in dtype, any strides
  Strides4 attn_out_stride;
  const void* attn_lse = nullptr;  // (B, H, L) contiguous in the accumulation type
};

// The backward reads q, out (the merged out'), lse (the merged lse'), dout, dlse, the sinks, the
// padding, the sizes and the scale; it adds the sink's part to dq in place (dq holds the fused
// backward's result, with any strides: dq_stride) and writes dsink_k / dsink_v / dsink_logit
// where they are set. dk and dv are not touched. On CUDA, q, dout, out and dq need a unit last
// stride.
struct SinkMergeBwdParams : SinkAttentionBwdParams {
  Strides4 dq_stride;
};

}  // namespace sinkdlm
