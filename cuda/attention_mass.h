// Torch-free CUDA launcher for the attention-mass kernel (see csrc/analysis/attention_mass_params.h
// for the arguments and the result's meaning).
#pragma once

#include <cuda_runtime_api.h>

#include "../csrc/analysis/attention_mass_params.h"

namespace sinkdlm {

// Enqueues the kernel on `stream`; returns the launch error (cudaSuccess when fine). T is float or
// double. All pointers are device pointers.
template <typename T>
cudaError_t launch_attention_mass(const AttentionMassParams<T>& p, cudaStream_t stream);

}  // namespace sinkdlm
