// Sink attention on the CPU, free of torch (see sink_attention_params.h for the arguments and the
// math). The sink starts each row's online softmax, so it costs no extra tile.
//   sink_attention_gemms_cpu.h   the tile GEMM policies (BLAS, or bf16 with fp32 sums)
//   sink_attention_kernel_cpu.h  the tiled forward and backward, one template per pass
//   sink_attention_cpu.cpp       these entry points: dtype dispatch, choice of GEMM policy
#pragma once

#include "common/cpu_context.h"
#include "sink_attention/sink_attention_params.h"

namespace sinkdlm {

// Writes p.out and p.lse.
void sink_attention_fwd_cpu(const SinkAttentionParams& p, const CpuContext& ctx);

// Writes p.dq, p.dk, p.dv and the sink gradients that p asks for.
void sink_attention_bwd_cpu(const SinkAttentionBwdParams& p, const CpuContext& ctx);

}  // namespace sinkdlm
