// The sink merged into a stock attention's output, lse and gradients on the CPU, free of torch
// (the math is in sink_merge_params.h; cuda/sink_merge.h is the CUDA twin).
#pragma once

#include "common/cpu_context.h"
#include "sink_attention/sink_merge_params.h"

namespace sinkdlm {

// Writes p.out and p.lse from the attention over the real keys (p.attn_out, p.attn_lse).
// p.out may alias p.attn_out when both have the same strides. Instantiated for (T, A) = (float,
// float), (double, double), (float16, float), (bfloat16, float).
template <typename T, typename A>
void sink_merge_fwd_cpu(const SinkMergeParams<T, A>& p, const CpuContext& ctx);

// Adds the sink's part to p.dq and writes the sink gradients; deterministic (fixed order).
template <typename T, typename A>
void sink_merge_bwd_cpu(const SinkMergeBwdParams<T, A>& p, const CpuContext& ctx);

}  // namespace sinkdlm
