// Attention mass per key, Ā_j = (1/S) Σ_i softmax_i(j), for one attention call, computed from the
// forward's log-sum-exp in a second pass over the keys: the scores in 64 x 512 blocks by the
// context's GEMM, exp(S - lse) and the column sums by the vectorised row helpers; memory O(L·D)
// per head, never L×L.
// Torch-free: raw pointers and element strides. Used by csrc/analysis/attention_mass_ops.cpp.
#pragma once

#include "analysis/attention_mass_params.h"
#include "common/cpu_context.h"

namespace sinkdlm {

// Computes every (batch, head), split across ctx's threads. Returns false (and writes nothing) if
// the parameters are inconsistent.
bool attention_mass_cpu(const AttentionMassParams& p, const CpuContext& ctx);

}  // namespace sinkdlm
