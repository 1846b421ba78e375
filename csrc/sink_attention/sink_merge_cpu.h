// The sink merged into a stock attention's output, lse and gradients on the CPU, free of torch
// (sink_merge_params.h has the arguments and the math; cuda/sink_merge.h is the CUDA twin).
#pragma once

#include "common/cpu_context.h"
#include "sink_attention/sink_merge_params.h"

namespace sinkdlm {

// Writes p.out and p.lse from the attention over the real keys (p.attn_out, p.attn_lse).
void sink_merge_fwd_cpu(const SinkMergeParams& p, const CpuContext& ctx);

// Adds the sink's part to p.dq and writes the sink gradients p asks for; deterministic (one
// thread sums each (b, h) in row order, then heads and the batch are summed in order).
void sink_merge_bwd_cpu(const SinkMergeBwdParams& p, const CpuContext& ctx);

}  // namespace sinkdlm
