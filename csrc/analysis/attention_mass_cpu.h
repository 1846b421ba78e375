// Attention mass per key, Ā_j = (1/S) Σ_i softmax_i(j), for one attention call, computed from the
// forward's log-sum-exp in a second pass over the keys: memory O(L·D) per head, never L×L.
// Torch-free: raw pointers and element strides. Used by csrc/analysis/attention_mass_ops.cpp.
#pragma once

#include <cstdint>

#include "analysis/attention_mass_params.h"

namespace sinkdlm {

// Computes the (batch, head) pairs with flat index bh in [bh_begin, bh_end), so callers can split
// the work across threads. Returns false (and writes nothing) if the parameters are inconsistent.
template <typename T>
bool attention_mass_cpu(const AttentionMassParams<T>& p, int64_t bh_begin, int64_t bh_end);

}  // namespace sinkdlm
